"""Who runs next when every engine slot is busy: queueing, fairness, admission."""

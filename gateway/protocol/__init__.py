"""Wire formats: request models and one encoder per format, each in its own module.

``wire`` holds what every format shares (the lenient base model, the JSON body
parser, token estimates); ``openai``, ``ollama`` and ``responses`` hold their
format's request models, response builders, stream encoder and error body.
"""

"""aksis: train a small GPT on your own text, share it on the Hugging Face Hub, show it off in a Space.

Importing the package does no work, touches no network and reads no environment variables; the
submodules are imported on demand:

    from aksis.config import ModelConfig
    from aksis.model import GPT
    from aksis.tokenizer import Tokenizer
"""

__version__ = "0.1.0"

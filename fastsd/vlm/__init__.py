"""Vision-language models: the shared OpenAI-compatible client, local and endpoint engines, captions, questions."""

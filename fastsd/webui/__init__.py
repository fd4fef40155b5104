"""Web UIs: the built-in server, and AUTOMATIC1111 / Forge / ComfyUI launched with fastsd's models."""

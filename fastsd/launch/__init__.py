"""Running a web UI for the user: A1111, Forge, ComfyUI or the built-in one, behind a tunnel.

``launcher.py`` is ``fastsd webui``'s front door (tunnel choice, login rule, model links); for the
external backends, ``backends.py`` holds them as data plus the classes that build their argv,
``pyenv.py`` their venvs, ``supervise.py`` runs and watches their process, ``modelfolders.py``
links the home's models in and ``controlnet.py`` fetches their ControlNets; ``tunnel.py`` makes
any local port public. The built-in diffusers server itself is :mod:`fastsd.webui`.
"""

import os


def record(line: str) -> None:
    path = os.environ.get("STANDIN_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")

import re

from ._log import record


def eval_js(script, ignore_result=False, timeout_sec=None):
    record(f"output.eval_js {script}")
    port = re.search(r"proxyPort\((\d+)", script)
    if port:
        return f"http://127.0.0.1:{port.group(1)}/"
    return None


def serve_kernel_port_as_iframe(port, path="/", width="100%", height=800, cache_in_notebook=False):
    record(f"output.serve_kernel_port_as_iframe {port}")


def serve_kernel_port_as_window(port, path="/", anchor_text=None):
    record(f"output.serve_kernel_port_as_window {port}")

"""The Gradio app: txt2img / img2img / inpaint tabs, model picker, live progress, outputs gallery.

It is mounted on the same FastAPI server as the API and submits to the same GPU worker, so UI
users and API clients share one queue and one loaded model. Every image is saved under
``<home>/outputs/YYYY-MM-DD/`` with its A1111 infotext, and the gallery shows those files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from ..errors import FastsdError, UserInputError
from . import samplers
from .api import Backend
from .generate import GenerationRequest

#: UI starting values; ``start(ui_defaults=...)`` overrides them (e.g. 1024 px for SDXL).
UI_DEFAULTS: dict[str, Any] = {
    "sampler_name": "DPM++ 2M Karras",
    "scheduler": "Automatic",
    "steps": 20,
    "cfg_scale": 7.0,
    "width": 512,
    "height": 512,
    "denoising_strength": 0.75,
}
POLL_SECONDS = 0.3
RECENT_OUTPUTS = 60
MASKED_CONTENT = ["fill", "original", "latent noise", "latent nothing"]


def editor_mask(value: dict[str, Any] | None) -> tuple[Image.Image | None, Image.Image | None]:
    """(background image, mask) from a Gradio ImageEditor value: painted pixels become white."""
    if not value or value.get("background") is None:
        return None, None
    background = value["background"].convert("RGB")
    mask = Image.new("L", background.size, 0)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A").point(lambda a: 255 if a > 0 else 0)
        if alpha.size != background.size:
            alpha = alpha.resize(background.size)
        mask.paste(255, mask=alpha)
    return background, mask


def recent_outputs(outputs_dir: Path, limit: int = RECENT_OUTPUTS) -> list[tuple[str, str]]:
    """The newest saved images (path, caption), newest first, for the Outputs tab."""
    files = sorted(outputs_dir.glob("*/*.png"), key=lambda p: p.stat().st_mtime, reverse=True)[:limit]
    return [(str(p), f"{p.parent.name}/{p.name}") for p in files]


def build_ui(backend: Backend, defaults: dict[str, Any] | None = None) -> gr.Blocks:
    """The Gradio Blocks app over ``backend`` (mount it with ``gr.mount_gradio_app``)."""
    d = {**UI_DEFAULTS, **(defaults or {})}
    manager, worker = backend.manager, backend.worker
    state = worker.state
    sampler_names = [s.name for s in samplers.SAMPLERS]

    def checkpoints() -> list[str]:
        return [e.title for e in manager.listed("checkpoint")]

    def switch_model(title: str) -> str:
        if not title:
            return ""
        try:
            backend.submit(lambda: manager.set_options({"sd_model_checkpoint": title}), "load model").result()
        except FastsdError as err:
            raise gr.Error(str(err)) from None
        return f"Loaded {title}"

    def refresh_models() -> Any:
        manager.refresh()
        return gr.update(choices=checkpoints(), value=manager.options.get("sd_model_checkpoint"))

    def generate(task: str, *values: Any):
        (prompt, negative, sampler, schedule, steps, cfg, width, height, batch, count, seed, clip_skip) = values[:12]
        extra = values[12:]
        req = GenerationRequest(
            prompt=prompt or "",
            negative_prompt=negative or "",
            sampler_name=sampler,
            scheduler=schedule,
            steps=int(steps),
            cfg_scale=float(cfg),
            width=int(width),
            height=int(height),
            batch_size=int(batch),
            n_iter=int(count),
            seed=int(seed),
            clip_skip=int(clip_skip),
        )
        if req.width % 8 or req.height % 8:
            raise gr.Error("width and height must be multiples of 8")
        if task == "img2img":
            image, strength = extra
            if image is None:
                raise gr.Error("upload an image to start from")
            req.init_images, req.denoising_strength = [image], float(strength)
        elif task == "inpaint":
            editor, strength, blur, area, padding, content = extra
            image, mask = editor_mask(editor)
            if image is None:
                raise gr.Error("upload an image, then paint the area to repaint")
            if mask is None or mask.getbbox() is None:
                raise gr.Error("paint the area to repaint with the brush (the mask is empty)")
            req.init_images, req.mask, req.denoising_strength = [image], mask, float(strength)
            req.mask_blur, req.inpaint_full_res = int(blur), area == "Only masked"
            req.inpaint_full_res_padding, req.inpainting_fill = int(padding), MASKED_CONTENT.index(content)
        try:
            future = backend.run_generation(req, save=True)
        except UserInputError as err:  # over the server's pixel budget
            raise gr.Error(str(err)) from None
        job_id = future.job_id
        while not future.done():
            if state.job_id == job_id and state.busy:
                value, eta = state.progress()
                text = f"**{value * 100:.0f}%** · step {state.sampling_step}/{state.sampling_steps} · ETA {eta:.1f}s"
                preview = manager.preview()
                yield gr.skip(), gr.skip(), text, preview if preview is not None else gr.skip()
            else:
                yield gr.skip(), gr.skip(), f"Waiting in queue ({max(worker.pending, 1)} job(s) ahead)", gr.skip()
            time.sleep(POLL_SECONDS)
        try:
            result, paths = future.result()
        except UserInputError as err:
            raise gr.Error(str(err)) from None
        except FastsdError as err:
            raise gr.Error(str(err)) from None
        gallery = [(str(p), f"seed {s}") for p, s in zip(paths, result.seeds, strict=True)]
        status = "Interrupted" if result.interrupted else f"Done: {len(paths)} image(s) saved to {paths[0].parent}"
        yield gallery, "\n\n".join(result.infotexts), status, None

    with gr.Blocks(title="fastsd") as demo:
        gr.Markdown("## fastsd · Stable Diffusion")
        with gr.Row():
            model = gr.Dropdown(
                choices=checkpoints(),
                value=manager.options.get("sd_model_checkpoint"),
                label="Checkpoint",
                elem_id="model_picker",
                scale=4,
            )
            refresh = gr.Button("Refresh models", scale=1)
            model_status = gr.Markdown(elem_id="model_status")
        model.change(switch_model, model, model_status)
        refresh.click(refresh_models, None, model)

        with gr.Tabs():
            for task in ("txt2img", "img2img", "inpaint"):
                with gr.Tab(task, id=task):
                    with gr.Row():
                        with gr.Column(scale=1):
                            prompt = gr.Textbox(label="Prompt", lines=3, elem_id=f"{task}_prompt")
                            negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{task}_negative")
                            extra: list[Any] = []
                            if task == "img2img":
                                extra.append(gr.Image(label="Image", type="pil", elem_id="img2img_image"))
                            elif task == "inpaint":
                                extra.append(
                                    gr.ImageEditor(
                                        label="Image: paint the area to repaint",
                                        type="pil",
                                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                        elem_id="inpaint_editor",
                                    )
                                )
                            with gr.Row():
                                sampler = gr.Dropdown(sampler_names, value=d["sampler_name"], label="Sampling method")
                                schedule = gr.Dropdown(
                                    list(samplers.SCHEDULE_TYPES), value=d["scheduler"], label="Schedule type"
                                )
                            steps = gr.Slider(
                                1, 150, value=d["steps"], step=1, label="Sampling steps", elem_id=f"{task}_steps"
                            )
                            with gr.Row():
                                width = gr.Slider(
                                    64, 2048, value=d["width"], step=8, label="Width", elem_id=f"{task}_width"
                                )
                                height = gr.Slider(
                                    64, 2048, value=d["height"], step=8, label="Height", elem_id=f"{task}_height"
                                )
                            with gr.Row():
                                batch = gr.Slider(1, 8, value=1, step=1, label="Batch size")
                                count = gr.Slider(1, 100, value=1, step=1, label="Batch count")
                            with gr.Row():
                                cfg = gr.Slider(1, 30, value=d["cfg_scale"], step=0.5, label="CFG scale")
                                seed = gr.Number(
                                    value=-1, precision=0, label="Seed (-1: random)", elem_id=f"{task}_seed"
                                )
                                clip_skip = gr.Slider(1, 12, value=1, step=1, label="Clip skip")
                            if task != "txt2img":
                                extra.append(
                                    gr.Slider(
                                        0, 1, value=d["denoising_strength"], step=0.01, label="Denoising strength"
                                    )
                                )
                            if task == "inpaint":
                                extra += [
                                    gr.Slider(0, 64, value=4, step=1, label="Mask blur"),
                                    gr.Radio(
                                        ["Whole picture", "Only masked"], value="Only masked", label="Inpaint area"
                                    ),
                                    gr.Slider(0, 256, value=32, step=4, label="Only masked padding, pixels"),
                                    gr.Radio(MASKED_CONTENT, value="original", label="Masked content"),
                                ]
                        with gr.Column(scale=1):
                            with gr.Row():
                                go = gr.Button("Generate", variant="primary", elem_id=f"{task}_generate")
                                stop = gr.Button("Interrupt", elem_id=f"{task}_interrupt")
                                skip = gr.Button("Skip", elem_id=f"{task}_skip")
                            progress = gr.Markdown(elem_id=f"{task}_progress")
                            preview = gr.Image(
                                label="Live preview", interactive=False, height=160, elem_id=f"{task}_preview"
                            )
                            gallery = gr.Gallery(label="Output", columns=2, format="png", elem_id=f"{task}_gallery")
                            info = gr.Textbox(label="Generation parameters", lines=4, elem_id=f"{task}_info")
                    inputs = [
                        prompt,
                        negative,
                        sampler,
                        schedule,
                        steps,
                        cfg,
                        width,
                        height,
                        batch,
                        count,
                        seed,
                        clip_skip,
                        *extra,
                    ]
                    go.click(
                        lambda *v, _t=task: (yield from generate(_t, *v)),
                        inputs,
                        [gallery, info, progress, preview],
                        concurrency_limit=None,
                    )
                    stop.click(lambda: state.interrupt(), None, None, queue=False)
                    skip.click(lambda: state.skip(), None, None, queue=False)
            with gr.Tab("Outputs", id="outputs"):
                outputs_dir = Path(manager.options["outdir_samples"])
                reload = gr.Button("Refresh", elem_id="outputs_refresh")
                history = gr.Gallery(
                    label=f"Saved in {outputs_dir}", columns=4, format="png", elem_id="outputs_gallery"
                )
                reload.click(lambda: recent_outputs(outputs_dir), None, history)
        demo.load(lambda: recent_outputs(Path(manager.options["outdir_samples"])), None, history)
    return demo

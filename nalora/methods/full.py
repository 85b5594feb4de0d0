"""Non-adapter baselines: ``full`` fine-tuning and ``head`` (only the task head / connector trains)."""

from __future__ import annotations

from nalora.adapted import Adapted
from nalora.methods.registry import Method, register_method


def _check_paths(model, trainable: list[str]) -> None:
    names = {n for n, _ in model.named_modules()}
    for t in trainable:
        if t not in names:
            raise ValueError(f"trainable module {t!r} not found in {type(model).__name__}")


@register_method("full")
class Full(Method):
    """Every parameter trains; no adapter. The upper reference, at full memory and storage cost."""

    uses_adapters = False

    def build(self, model, plan, *, rank, alpha, dropout, trainable, options):
        self.resolve_options(options)
        _check_paths(model, trainable)
        for p in model.parameters():
            p.requires_grad_(True)
        report = [
            {"name": "*", "tower": "all", "role": "all", "layout": "-", "kind": "full", "applied": "full"}
        ]
        return Adapted(model=model, method=self, report=report, trainable=list(trainable))

    def save(self, adapted, path):
        """The whole model (frozen parts included), so a run's artifact reloads on its own."""
        _save_full(adapted, path)


def _save_full(adapted: Adapted, path) -> None:
    """HF models save as usual; other modules (timm, open_clip) as one safetensors state dict."""
    from pathlib import Path

    model = adapted.model
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(str(path))
        return
    from safetensors.torch import save_model

    Path(path).mkdir(parents=True, exist_ok=True)
    save_model(model, str(Path(path) / "model.safetensors"))


@register_method("head")
class Head(Method):
    """Only the ``trainable`` modules (task head, VLM connector) train: the zero-adapter reference."""

    uses_adapters = False

    def build(self, model, plan, *, rank, alpha, dropout, trainable, options):
        self.resolve_options(options)
        if not trainable:
            raise ValueError("method 'head' needs at least one trainable module (trainable=[...] is empty)")
        _check_paths(model, trainable)
        model.requires_grad_(False)
        for t in trainable:
            model.get_submodule(t).requires_grad_(True)
        report = [
            {"name": t, "tower": "-", "role": "trainable", "layout": "-", "kind": "head", "applied": "head"}
            for t in trainable
        ]
        return Adapted(model=model, method=self, report=report, trainable=list(trainable))

    def save(self, adapted, path):
        """The whole model (frozen parts included), so a run's artifact reloads on its own."""
        _save_full(adapted, path)

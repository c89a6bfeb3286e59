"""`vitlab models`: every registered variant with its parameters and forward GFLOPs."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list every model with its parameters and forward GFLOPs",
                       description="List every named model variant with its parameter count (1000 classes) "
                                   "and forward GFLOPs for one image at its default size.")
    p.add_argument("--family", default=None, help="only this family (vit, hybrid, cvt, convmixer, resnet)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOPs count (faster)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from ..flops import count_flops, count_params
    from .registry import get_spec, list_models

    names = list_models(args.family)
    if args.family and not names:
        from ..errors import ConfigError
        from .registry import _REGISTRY

        families = sorted({s.family for s in _REGISTRY.values()})
        raise ConfigError(f"no family {args.family!r}; choose one of: {', '.join(families)}")
    table = Table(title="vitlab models (1000 classes; GFLOPs = 2 x multiply-adds of one forward pass)")
    for col in ("name", "family", "aliases", "img", "params (M)", "GFLOPs"):
        table.add_column(col, justify="right" if col in ("img", "params (M)", "GFLOPs") else "left")
    from .registry import create_model

    for name in names:
        spec = get_spec(name)
        with torch.device("meta"):  # shapes only: no memory, no init, counts in milliseconds
            model = create_model(name)
        params = count_params(model) / 1e6
        flops = "-" if args.no_flops else f"{count_flops(model) / 1e9:.2f}"
        table.add_row(name, spec.family, ", ".join(spec.aliases), str(spec.default_img_size), f"{params:.1f}", flops)
        del model
    Console().print(table)
    return 0

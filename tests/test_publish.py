"""Issue 23: publishing vitlab models for transformers and timm users, and to the Hub.
The peers load what vitlab writes with their own code (from_pretrained); logits must match."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vitlab
from vitlab import ConfigError
from vitlab.models import sources
from vitlab.models.publish import export_hf, export_timm, push_to_hub

transformers = pytest.importorskip("transformers")
from transformers import CvtForImageClassification, ViTConfig, ViTForImageClassification  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def randomise(module: nn.Module, std: float = 0.1, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def image_folder(root: Path, classes=("cat", "dog", "owl"), per_class: int = 12, size: int = 20) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = (torch.rand(size, size, 3, generator=g) * 80 + 60 * c).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_round_trip_transformers_finetune_export_transformers(tmp_path):
    """transformers ViT folder -> `vitlab finetune` on an image folder -> `vitlab export --format hf` -> transformers."""
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                    patch_size=8, num_labels=7)
    hf = ViTForImageClassification(cfg).eval()
    randomise(hf, 0.2)
    hf.save_pretrained(str(tmp_path / "pretrained"))
    data = image_folder(tmp_path / "images")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, "-m", "vitlab", "finetune", str(tmp_path / "pretrained"), "--dataset",
                        "imagefolder", "--data-dir", str(data), "--img-size", "16", "--epochs", "2", "--out",
                        str(tmp_path / "runs"), "--name", "ft", "--quiet", "--lr", "0.05", "--batch-size", "8"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "runs" / "ft"
    r = subprocess.run([sys.executable, "-m", "vitlab", "export", str(run), "--format", "hf", "--out",
                        str(tmp_path / "export")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "export"
    assert f"to {out}" in r.stdout
    back = ViTForImageClassification.from_pretrained(str(out)).eval()
    ours, info = vitlab.train.load_model(run)
    assert back.config.num_labels == 3 and back.config.id2label[2] == "owl" and back.config.image_size == 16
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        a, b = back(x).logits, ours(x)
    assert (a - b).abs().max() < 1e-4 and b.abs().max() > 1e-3
    # the fine-tuned backbone moved away from the pre-trained one (the run really trained)
    start = vitlab.from_transformers(hf).state_dict()["blocks.0.attn.qkv.weight"]
    assert not torch.allclose(start, ours.state_dict()["blocks.0.attn.qkv.weight"])
    card = (out / "README.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['val_acc']:.4f}" in card and "vitlab finetune" in card and "imagefolder" in card
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == pytest.approx(info["mean"]) and pre["size"] == {"height": 16, "width": 16}


def test_cvt_exports_to_transformers_and_reads_back(tmp_path):
    # depths as CvT-13's grow (transformers indexes stage i's drop-path list at i: depth must exceed i)
    model = vitlab.create_model("cvt_tiny", num_classes=4, img_size=32, depths=(1, 2, 3)).eval()
    randomise(model)
    out = export_hf(model, tmp_path / "cvt", info={"class_names": ["a", "b", "c", "d"]})
    hf = CvtForImageClassification.from_pretrained(str(out)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert (hf(x).logits - ref).abs().max() < 1e-4
        back, info = sources.load_source(str(out))  # a Hugging Face CvT folder as a SOURCE
        assert (back(x) - ref).abs().max() < 1e-4
    assert info["class_names"] == ["a", "b", "c", "d"]
    assert (out / "README.md").is_file()


def test_export_timm_layout_config_and_read_back(tmp_path):
    model = vitlab.create_model("vit_nano_p2", num_classes=5, img_size=16, in_chans=3, head="mlp_tanh",
                                patch_size=4).eval()
    randomise(model)
    out = export_timm(model, tmp_path / "timm", info={"mean": [0.5] * 3, "std": [0.25] * 3})
    sd = load_file(str(out / "model.safetensors"))
    assert "pre_logits.fc.weight" in sd and "pre_logits.0.weight" not in sd
    assert set(sd) == {k.replace("pre_logits.0.", "pre_logits.fc.") for k in model.state_dict()}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "vit_base_patch4_16" and cfg["model_args"]["num_heads"] == 4
    assert cfg["pretrained_cfg"]["std"] == [0.25] * 3 and cfg["num_classes"] == 5
    x = torch.randn(2, 3, 16, 16)
    back, info = sources.load_source(str(out), model_name="vit_nano_p2")
    with torch.no_grad():
        assert (back(x) - model(x)).abs().max() < 1e-5
    assert info["mean"] == (0.5, 0.5, 0.5)


def test_export_timm_convmixer_is_timms_layout(tmp_path):
    from test_sources import _TimmConvMixer

    model = vitlab.create_model("convmixer_256_8", num_classes=3, img_size=32).eval()
    randomise(model)
    out = export_timm(model, tmp_path / "cm")
    spec = vitlab.models.get_spec("convmixer_256_8").config
    ref = _TimmConvMixer(spec["dim"], spec["depth"], spec["kernel_size"], spec["patch_size"], 3).eval()
    ref.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ref(x) - model(x)).abs().max() < 1e-4


def test_export_hf_refuses_what_transformers_cannot_express(tmp_path):
    model = vitlab.create_model("vit_nano_p2", num_classes=3, img_size=8, global_pool="avg")
    with pytest.raises(ConfigError, match="global_pool='avg'.*--format timm"):
        export_hf(model, tmp_path / "x")


def test_push_uploads_the_exported_folder(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    model = vitlab.create_model("vit_nano_p2", num_classes=3, img_size=8).eval()
    run = vitlab.train(dataset="digits", epochs=1, max_steps=1, out=str(tmp_path), name="run", tensorboard=False,
                       progress=False)
    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw)

    def upload_folder(self, *, folder_path, repo_id, **kw):
        folder = Path(folder_path)
        calls["upload"] = (repo_id, sorted(p.name for p in folder.iterdir()), (folder / "README.md").read_text(), kw)
        return "https://huggingface.co/alice/digits-vit/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    from vitlab.cli import main

    assert main(["push", str(run.run_dir), "alice/digits-vit", "--private"]) == 0
    assert calls["create"] == ("alice/digits-vit", {"private": True, "exist_ok": True})
    repo, files, card, kw = calls["upload"]
    assert repo == "alice/digits-vit"
    assert files == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert "digits" in card and "vitlab train --config" in card
    with pytest.raises(ConfigError, match="ORG_OR_USER/NAME"):
        push_to_hub(run.run_dir, "no-slash")
    del model


def test_export_formats_are_offered_to_vitlab_export():
    from vitlab.models.publish_cli import export_formats

    assert set(export_formats()) == {"hf", "timm"}
    assert export_formats()["hf"] is export_hf

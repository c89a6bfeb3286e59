"""Issue 23: weights from anywhere (vitlab runs, Hugging Face and timm folders/files, Google .npz,
Hub ids through a local cache, published tags) into `vitlab finetune` and `train init_from=`,
and the layouts that did not load before (timm fc_norm GAP, timm ConvMixer, big_vision MAP head).
Checkpoints are written here in each peer's own layout, by hand or with the peer's own code
(transformers' save_pretrained), never through vitlab's converters."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import vitlab
from vitlab import CheckpointError, ConfigError
from vitlab.models import sources
from vitlab.models.layers import resample_abs_pos_embed

transformers = pytest.importorskip("transformers")
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def randomise(module: nn.Module, std: float = 0.2, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def hf_folder(path: Path, num_labels: int = 5, image_size: int = 16, patch: int = 4, channels: int = 3) -> Path:
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=image_size, patch_size=patch, num_labels=num_labels, num_channels=channels)
    hf = ViTForImageClassification(cfg).eval()
    randomise(hf)
    hf.save_pretrained(str(path))
    return path


def hub_cache(root: Path, repo_id: str, files_from: Path, commit: str = "0" * 39 + "1") -> Path:
    """huggingface_hub's cache layout: models--ORG--NAME/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def run_cli(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg", **env}
    return subprocess.run([sys.executable, "-m", "vitlab", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=300)


# ----------------------------------------------------------------------------- init_from
def test_init_from_starts_from_the_source_weights(tmp_path):
    folder = hf_folder(tmp_path / "hf", num_labels=5, image_size=16)
    ref = vitlab.from_transformers(ViTForImageClassification.from_pretrained(str(folder))).state_dict()
    model = vitlab.create_model("vit_nano_p2", num_classes=10, img_size=32, in_chans=3, embed_dim=32, depth=2,
                                patch_size=4, mlp_ratio=2.0, norm_eps=1e-12)
    head_before = model.head.weight.detach().clone()
    notes = sources.init_from_source(model, str(folder))
    got = model.state_dict()
    for k, v in ref.items():
        if k.startswith("head."):
            continue
        want = resample_abs_pos_embed(v, (8, 8), (4, 4), 1) if k == "pos_embed" else v
        assert torch.equal(got[k], want), k
    assert torch.equal(got["head.weight"], head_before)  # 5 source classes, 10 here: the head is kept
    text = "\n".join(notes)
    assert "position embeddings resampled 4x4 -> 8x8" in text
    assert "re-initialised head.weight, head.bias" in text
    assert "loaded" in text and "Hugging Face ViTForImageClassification" in text


def test_train_init_from_changes_the_starting_weights_and_logs_it(tmp_path, capsys):
    folder = hf_folder(tmp_path / "hf", num_labels=5, image_size=16)
    ref = vitlab.from_transformers(ViTForImageClassification.from_pretrained(str(folder))).state_dict()
    # lr tiny, one step: the saved weights are the starting weights to within 1e-6
    run = vitlab.train(dataset="digits", model="vit_nano_p2", img_size=16, epochs=1, max_steps=1, lr=1e-9,
                       min_lr=0.0, weight_decay=0.0, out=str(tmp_path), name="init", tensorboard=False,
                       progress=False, init_from=str(folder), data_options={"in_chans": 3},
                       model_kwargs=dict(embed_dim=32, depth=2, patch_size=4, mlp_ratio=2.0, norm_eps=1e-12))
    model, _ = vitlab.train.load_model(run.run_dir)
    got = model.state_dict()
    for k in ("patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "norm.bias", "pos_embed"):
        assert (got[k] - ref[k]).abs().max() < 1e-6, k
    assert got["head.weight"].shape[0] == 10
    out = capsys.readouterr().out
    # every tensor but the two of the head came from the source
    assert f"init_from: loaded {len(got) - 2} tensors from Hugging Face ViTForImageClassification" in out
    assert "position embeddings resampled 4x4 -> 4x4" not in out  # same grid: nothing resampled, nothing said
    assert "re-initialised head.weight, head.bias" in out


def test_init_from_bad_sources_fail_with_one_clear_error(tmp_path):
    r = run_cli(["train", "epochs=1", f"out={tmp_path}", "init_from=no/such/weights.pth"], tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "weights 'no/such/weights.pth' not found" in r.stderr
    # another architecture: every difference listed, no silent partial load
    folder = hf_folder(tmp_path / "hf", image_size=16)
    model = vitlab.create_model("vit_nano_p2", num_classes=10, img_size=16, in_chans=3)  # width 64, 4 blocks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not match the model vit_nano_p2"):
        sources.init_from_source(model, str(folder))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- finetune SOURCE
def test_finetune_from_an_offline_hub_cache(tmp_path, monkeypatch):
    cache = hub_cache(tmp_path / "hub", "org/tiny-vit", hf_folder(tmp_path / "hf"))
    env = dict(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    r = run_cli(["finetune", "hf-hub:org/tiny-vit", "--dataset", "digits", "--epochs", "1", "--out",
                 str(tmp_path / "runs"), "--name", "ft", "--quiet", "max_steps=2"], tmp_path, **env)
    assert r.returncode == 0, r.stderr
    assert "fine-tuned" in r.stdout
    src = json.loads((tmp_path / "runs" / "ft" / "source.json").read_text())
    assert src["source"] == "hf-hub:org/tiny-vit" and "Hugging Face ViTForImageClassification" in src["read"]
    # a pinned revision is looked up in the cache too
    commit = "0" * 39 + "1"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert sources.hub_download("org/tiny-vit", commit).name == commit
    with pytest.raises(CheckpointError, match="at revision v9 is not in the local Hugging Face cache"):
        sources.hub_download("org/tiny-vit", "v9")
    # not in the cache, offline: one line saying so and where the cache is
    r = run_cli(["finetune", "hf-hub:org/absent", "--dataset", "digits"], tmp_path, **env)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert "not in the local Hugging Face cache" in r.stderr and str(cache) in r.stderr


def test_timm_file_needs_model_and_reads_fc_norm_gap(tmp_path):
    """timm's GAP layout (fc_norm.*, no final norm), written by hand from timm's names."""
    g = torch.Generator().manual_seed(1)
    D, depth, p, grid, K = 32, 2, 4, 4, 3
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    sd = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + grid * grid, D), "patch_embed.proj.weight": r(D, 3, p, p),
          "patch_embed.proj.bias": r(D), "fc_norm.weight": r(D), "fc_norm.bias": r(D), "head.weight": r(K, D),
          "head.bias": r(K)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": r(D), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D),
                   b + "attn.qkv.bias": r(3 * D), b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                   b + "norm2.weight": r(D), b + "norm2.bias": r(D), b + "mlp.fc1.weight": r(4 * D, D),
                   b + "mlp.fc1.bias": r(4 * D), b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D)})
    path = tmp_path / "timm_gap.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ConfigError, match="pass --model NAME"):
        sources.load_source(str(path))
    model, info = sources.load_source(str(path), model_name="vit_nano_p2")  # 4 heads, like the checkpoint
    assert model.global_pool == "avg" and model.fc_norm is not None and isinstance(model.norm, nn.Identity)
    got = model.state_dict()
    assert set(got) == set(sd)
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    # the function timm computes: mean of the (un-normalised) patch tokens, then fc_norm, then head
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = model.forward_features(x)
        ref = F.linear(F.layer_norm(tokens[:, 1:].mean(1), (D,), sd["fc_norm.weight"], sd["fc_norm.bias"], 1e-6),
                       sd["head.weight"], sd["head.bias"])
        assert (model(x) - ref).abs().max() < 1e-5
    assert info["config"]["model_kwargs"]["fc_norm"] is True


class _Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class _TimmConvMixer(nn.Module):
    """The ConvMixer paper's own nn.Sequential layout, as timm keeps it (stem / blocks / head)."""

    def __init__(self, dim, depth, k, p, n):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, p, stride=p), nn.GELU(), nn.BatchNorm2d(dim))
        self.blocks = nn.Sequential(*[nn.Sequential(
            _Residual(nn.Sequential(nn.Conv2d(dim, dim, k, groups=dim, padding="same"), nn.GELU(), nn.BatchNorm2d(dim))),
            nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim)) for _ in range(depth)])
        self.head = nn.Linear(dim, n)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_timm_convmixer_layout_loads_with_the_same_logits(tmp_path):
    spec = vitlab.models.get_spec("convmixer_256_8").config
    ref = _TimmConvMixer(spec["dim"], spec["depth"], spec["kernel_size"], spec["patch_size"], 7).eval()
    randomise(ref, 0.1)
    with torch.no_grad():  # BN running statistics random too
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "convmixer.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    model, info = sources.load_source(str(path), model_name="convmixer_256_8")
    assert info["num_classes"] == 7
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() < 1e-4


def _flax_vit_npz(D=32, heads=4, depth=2, p=4, grid=4, K=3, map_head=True, seed=0) -> dict:
    """A big_vision ViT (MAP head, no class token) in its Flax parameter names."""
    g = np.random.default_rng(seed)
    r = lambda *s: (g.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    hd, M = D // heads, 2 * D
    a = {"embedding/kernel": r(p, p, 3, D), "embedding/bias": r(D), "pos_embedding": r(1, grid * grid, D),
         "Transformer/encoder_norm/scale": r(D), "Transformer/encoder_norm/bias": r(D), "head/kernel": r(D, K),
         "head/bias": r(K)}

    def mha(prefix):
        for n in ("query", "key", "value"):
            a[f"{prefix}/{n}/kernel"] = r(D, heads, hd)
            a[f"{prefix}/{n}/bias"] = r(heads, hd)
        a[f"{prefix}/out/kernel"] = r(heads, hd, D)
        a[f"{prefix}/out/bias"] = r(D)

    def mlp(prefix):
        a.update({f"{prefix}/Dense_0/kernel": r(D, M), f"{prefix}/Dense_0/bias": r(M),
                  f"{prefix}/Dense_1/kernel": r(M, D), f"{prefix}/Dense_1/bias": r(D)})

    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        a.update({b + "LayerNorm_0/scale": r(D), b + "LayerNorm_0/bias": r(D), b + "LayerNorm_1/scale": r(D),
                  b + "LayerNorm_1/bias": r(D)})
        mha(b + "MultiHeadDotProductAttention_0")
        mlp(b + "MlpBlock_0")
    if map_head:
        a["MAPHead_0/probe"] = r(1, 1, D)
        a["MAPHead_0/LayerNorm_0/scale"], a["MAPHead_0/LayerNorm_0/bias"] = r(D), r(D)
        mha("MAPHead_0/MultiHeadDotProductAttention_0")
        mlp("MAPHead_0/MlpBlock_0")
    return a


def _flax_forward(a: dict, x: torch.Tensor, depth=2) -> torch.Tensor:
    """big_vision's ViT forward written from the Flax modules' definitions, on the raw arrays."""
    t = {k: torch.from_numpy(v) for k, v in a.items()}
    ln = lambda z, pre: F.layer_norm(z, z.shape[-1:], t[pre + "/scale"], t[pre + "/bias"], 1e-6)  # noqa: E731

    def mha(q_in, kv_in, pre):
        q = torch.einsum("bnd,dhk->bnhk", q_in, t[pre + "/query/kernel"]) + t[pre + "/query/bias"]
        k = torch.einsum("bnd,dhk->bnhk", kv_in, t[pre + "/key/kernel"]) + t[pre + "/key/bias"]
        v = torch.einsum("bnd,dhk->bnhk", kv_in, t[pre + "/value/kernel"]) + t[pre + "/value/bias"]
        w = torch.einsum("bqhk,bshk->bhqs", q / q.shape[-1] ** 0.5, k).softmax(-1)
        o = torch.einsum("bhqs,bshk->bqhk", w, v)
        return torch.einsum("bqhk,hkd->bqd", o, t[pre + "/out/kernel"]) + t[pre + "/out/bias"]

    def mlp(z, pre):
        h = F.gelu(z @ t[pre + "/Dense_0/kernel"] + t[pre + "/Dense_0/bias"])
        return h @ t[pre + "/Dense_1/kernel"] + t[pre + "/Dense_1/bias"]

    # the patch kernel is HWIO (Flax), applied with stride p
    z = F.conv2d(x, t["embedding/kernel"].permute(3, 2, 0, 1), t["embedding/bias"], stride=t["embedding/kernel"].shape[0])
    z = z.flatten(2).transpose(1, 2) + t["pos_embedding"]
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        y = ln(z, b + "LayerNorm_0")
        z = z + mha(y, y, b + "MultiHeadDotProductAttention_0")
        z = z + mlp(ln(z, b + "LayerNorm_1"), b + "MlpBlock_0")
    z = ln(z, "Transformer/encoder_norm")
    probe = t["MAPHead_0/probe"].expand(z.shape[0], -1, -1)
    y = mha(probe, z, "MAPHead_0/MultiHeadDotProductAttention_0")
    y = y + mlp(ln(y, "MAPHead_0/LayerNorm_0"), "MAPHead_0/MlpBlock_0")
    return y[:, 0] @ t["head/kernel"] + t["head/bias"]


def test_big_vision_npz_with_map_head_loads_and_computes_the_same(tmp_path):
    arrays = _flax_vit_npz()
    path = tmp_path / "big_vision_map.npz"
    np.savez(path, **arrays)
    model, info = sources.load_source(str(path))  # heads, width, depth, pooling read from the arrays
    assert model.global_pool == "map" and model.cls_token is None and info["num_classes"] == 3
    assert info["img_size"] == 16
    assert torch.equal(model.attn_pool.latent, torch.from_numpy(arrays["MAPHead_0/probe"]))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (model(x) - _flax_forward(arrays, x)).abs().max() < 1e-4


def test_map_pooling_is_an_option_that_trains():
    model = vitlab.create_model("vit_nano_p2", num_classes=4, img_size=8, global_pool="map")
    assert model.cls_token is None
    x = torch.randn(3, 3, 8, 8)
    model(x).sum().backward()
    assert model.attn_pool.latent.grad is not None and model.attn_pool.latent.grad.abs().sum() > 0


def test_published_tag_brings_its_preprocessing_into_the_run(tmp_path, monkeypatch):
    from vitlab.models import registry

    # a tag pointing at a small timm-layout repo in an offline cache (the real ones are 100s of MB)
    D, p = 32, 4
    ref = vitlab.create_model("vit_nano_p2", num_classes=6, img_size=16, in_chans=3, embed_dim=D, depth=2,
                              patch_size=p)
    sd = {k.replace("pre_logits.0.", "pre_logits.fc."): v for k, v in ref.state_dict().items()}
    folder = tmp_path / "timm_repo"
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_nano_p2", "num_classes": 6,
        "pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "input_size": [3, 16, 16],
                           "interpolation": "bicubic", "crop_pct": 0.9}}))
    cache = hub_cache(tmp_path / "hub", "timm/vit_nano_p2.test", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tag = registry.PublishedWeights("vit_nano_p2.test", "vit_nano_p2", "timm/vit_nano_p2.test", "model.safetensors",
                                    "timm", 6, 16, mean=(0.11, 0.22, 0.33), std=(0.44, 0.55, 0.66))
    monkeypatch.setitem(registry.PUBLISHED, tag.tag, tag)
    run = vitlab.finetune(tag.tag, "digits", img_size=16, epochs=1, max_steps=1, out=str(tmp_path), name="tag",
                          tensorboard=False, progress=False, verbose=False)
    _, info = vitlab.train.load_model(run.run_dir)
    assert info["mean"] == pytest.approx((0.11, 0.22, 0.33)) and info["std"] == pytest.approx((0.44, 0.55, 0.66))
    rec = json.loads((Path(run.run_dir) / "source.json").read_text())
    assert rec["preprocessing"]["weights"] == "vit_nano_p2.test" and rec["preprocessing"]["crop_pct"] == 0.9
    # the same repo by its timm Hub id: every tensor of the timm layout lands (pre_logits.fc -> pre_logits.0)
    direct, _ = sources.load_source("timm/vit_nano_p2.test", model_name="vit_nano_p2")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(direct.eval()(x), ref.eval()(x))
    # eval normalises with the recorded statistics: its loss equals one computed by hand with them
    model, _ = vitlab.train.load_model(run.run_dir)
    res = vitlab.evaluate(run.run_dir, plot=False)
    from vitlab.data import AugmentConfig, BatchTransform, load_dataset

    val = load_dataset("digits", in_chans=3).val
    tf = BatchTransform(AugmentConfig(img_size=16), (0.11, 0.22, 0.33), (0.44, 0.55, 0.66), 10, train=False)
    x, y = tf(val.images, val.labels)
    with torch.no_grad():
        assert F.cross_entropy(model(x), y.long()).item() == pytest.approx(res["loss"], abs=1e-4)


def test_unknown_published_tag_suggests_the_close_one():
    with pytest.raises(CheckpointError, match="vit_b16.augreg_in21k"):
        sources.load_source("vit_b16.augreg_in21")


def _hwio(g, *shape):
    return (g.standard_normal(shape) * 0.2).astype(np.float32)


def test_vit_jax_hybrid_npz_every_tensor_lands(tmp_path):
    """vit_jax's R50+ViT names (conv_root, gn_root, block{i}/unit{j}/{conv,gn}{1,2,3}, conv_proj,
    gn_proj; the transformer as in ViT) for the small stride-4 stem; each array is checked at the
    vitlab parameter it must become."""
    g = np.random.default_rng(3)
    a = _flax_vit_npz(D=32, heads=4, depth=1, p=1, grid=8, K=5, map_head=False)
    a["cls"] = _hwio(g, 1, 1, 32)
    a["Transformer/posembed_input/pos_embedding"] = _hwio(g, 1, 65, 32)
    del a["pos_embedding"]
    for k in [k for k in a if "/MultiHeadDotProductAttention_0" in k or "LayerNorm_1" in k or "MlpBlock_0" in k]:
        a[k.replace("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1")
          .replace("LayerNorm_1", "LayerNorm_2").replace("MlpBlock_0", "MlpBlock_3")] = a.pop(k)
    a["embedding/kernel"] = _hwio(g, 1, 1, 256, 32)  # 1x1 patches on the stem's 256-channel map
    expect = {}  # npz name -> (vitlab name, torch layout)
    a["conv_root/kernel"] = _hwio(g, 3, 3, 3, 32)
    expect["conv_root/kernel"] = "stem.root.0.weight"
    for leaf, dst in (("scale", "weight"), ("bias", "bias")):
        a[f"gn_root/{leaf}"] = _hwio(g, 32)
        expect[f"gn_root/{leaf}"] = f"stem.root.1.{dst}"
    cin = 32
    for b, (mid, out) in enumerate(((32, 128), (64, 256)), start=1):
        u = f"block{b}/unit1/"
        shapes = {"conv1": (1, 1, cin, mid), "conv2": (3, 3, mid, mid), "conv3": (1, 1, mid, out),
                  "conv_proj": (1, 1, cin, out)}
        for conv, shape in shapes.items():
            a[u + conv + "/kernel"] = _hwio(g, *shape)
            expect[u + conv + "/kernel"] = (f"stem.stages.{b - 1}.0." +
                                           ("downsample.0.weight" if conv == "conv_proj" else f"{conv}.weight"))
        for gn, c in (("gn1", mid), ("gn2", mid), ("gn3", out), ("gn_proj", out)):
            for leaf, dst in (("scale", "weight"), ("bias", "bias")):
                a[f"{u}{gn}/{leaf}"] = _hwio(g, c)
                expect[f"{u}{gn}/{leaf}"] = (f"stem.stages.{b - 1}.0." +
                                            (f"downsample.1.{dst}" if gn == "gn_proj" else f"norm{gn[-1]}.{dst}"))
        cin = out
    path = tmp_path / "r_vit.npz"
    np.savez(path, **a)
    model, info = sources.load_source(str(path))
    spec = vitlab.models.get_spec(info["config"]["model"])
    assert model.stem is not None and {**spec.config, **info["config"]["model_kwargs"]}["hybrid_stem"] == "rsmall_s4"
    assert info["img_size"] == 32  # 8x8 tokens x stride 4
    sd = model.state_dict()
    for src, dst in expect.items():
        t = torch.from_numpy(a[src])
        want = t.permute(3, 2, 0, 1) if t.ndim == 4 else t
        assert torch.equal(sd[dst], want), (src, dst)
    assert len([k for k in sd if k.startswith("stem.")]) == len(expect)  # every stem tensor came from the file
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_bit_resnet_npz_every_tensor_lands(tmp_path):
    """big_transfer's names (resnet/root_block, block{i}/unit{jj}/{a,b,c}, a/proj, group_norm, head/conv2d)."""
    g = np.random.default_rng(4)
    a, expect = {}, {}
    wf, K = 0.5, 6
    root = int(64 * wf)
    a["resnet/root_block/standardized_conv2d/kernel"] = _hwio(g, 7, 7, 3, root)
    expect["resnet/root_block/standardized_conv2d/kernel"] = "stem.0.weight"
    cin = root
    for b in range(4):
        mid, out = int(64 * wf * 2 ** b), int(256 * wf * 2 ** b)
        u = f"resnet/block{b + 1}/unit01/"
        for part, (shape, c) in {"a": ((1, 1, cin, mid), cin), "b": ((3, 3, mid, mid), mid),
                                 "c": ((1, 1, mid, out), mid)}.items():
            r = "abc".index(part) + 1
            a[f"{u}{part}/standardized_conv2d/kernel"] = _hwio(g, *shape)
            expect[f"{u}{part}/standardized_conv2d/kernel"] = f"stages.{b}.0.conv{r}.weight"
            for leaf, dst in (("gamma", "weight"), ("beta", "bias")):
                a[f"{u}{part}/group_norm/{leaf}"] = _hwio(g, c)  # pre-activation: the norm before the conv
                expect[f"{u}{part}/group_norm/{leaf}"] = f"stages.{b}.0.norm{r}.{dst}"
        a[f"{u}a/proj/standardized_conv2d/kernel"] = _hwio(g, 1, 1, cin, out)
        expect[f"{u}a/proj/standardized_conv2d/kernel"] = f"stages.{b}.0.downsample.weight"
        cin = out
    for leaf, dst in (("gamma", "weight"), ("beta", "bias")):
        a[f"resnet/group_norm/{leaf}"] = _hwio(g, cin)
        expect[f"resnet/group_norm/{leaf}"] = f"norm.{dst}"
    a["resnet/head/conv2d/kernel"] = _hwio(g, 1, 1, cin, K)
    a["resnet/head/conv2d/bias"] = _hwio(g, K)
    path = tmp_path / "bit.npz"
    np.savez(path, **a)
    model, info = sources.load_source(str(path))
    spec = vitlab.models.get_spec(info["config"]["model"])
    assert info["num_classes"] == K and {**spec.config, **info["config"]["model_kwargs"]}["layers"] == (1, 1, 1, 1)
    sd = model.state_dict()
    for src, dst in expect.items():
        t = torch.from_numpy(a[src])
        assert torch.equal(sd[dst], t.permute(3, 2, 0, 1) if t.ndim == 4 else t), (src, dst)
    assert torch.equal(sd["head.weight"], torch.from_numpy(a["resnet/head/conv2d/kernel"])[0, 0].t())
    assert torch.equal(sd["head.bias"], torch.from_numpy(a["resnet/head/conv2d/bias"]))
    assert len(sd) == len(expect) + 2
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, K)

"""Real-world evaluation: LPIPS v0.1 (torchvision key layout, strict weight loading, metric properties) and paired
LR/HR folders (name matching, size checks before any network runs, metrics, SR-only folders)."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
from conftest import synthetic_image

# torchvision listings, written out (not taken from our module): conv index -> (C_out, C_in, k)
ALEX_CONVS = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
VGG_CONVS = dict(zip([0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
                     [(64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256), (512, 256),
                      (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]))
LIN_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
RELEASED_SUMS = {"alex": (2.349532, 16.143028, 39.268440, 27.197178, 20.317177),
                 "vgg": (6.925992, 8.858335, 17.515005, 51.521324, 47.034851)}


def trunk_state(trunk: str, seed: int = 0) -> dict:
    """A torchvision-format AlexNet/VGG16 state dict with He-initialised random weights (+ a classifier to ignore)."""
    gen = torch.Generator().manual_seed(seed)
    convs = ALEX_CONVS if trunk == "alex" else {i: (o, c, 3) for i, (o, c) in VGG_CONVS.items()}
    state = {}
    for i, (c_out, c_in, k) in convs.items():
        state[f"features.{i}.weight"] = torch.randn(c_out, c_in, k, k, generator=gen) * math.sqrt(2 / (c_in * k * k))
        state[f"features.{i}.bias"] = torch.randn(c_out, generator=gen) * 0.01
    state["classifier.1.weight"], state["classifier.1.bias"] = torch.randn(10, 20), torch.zeros(10)
    return state


def lin_state(trunk: str, seed: int = 0, released_sums: bool = False) -> dict:
    """Non-negative random lin weights; released_sums=True rescales each key to the released file's sum."""
    gen = torch.Generator().manual_seed(seed)
    state = {f"lin{i}.model.1.weight": torch.randn(1, c, 1, 1, generator=gen).abs()
             for i, c in enumerate(LIN_CHANNELS[trunk])}
    if released_sums:
        state = {k: w * (s / w.sum()) for (k, w), s in zip(state.items(), RELEASED_SUMS[trunk])}
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """{trunk: (trunk file, lin file)} with random weights, saved with torch.save."""
    root, files = tmp_path_factory.mktemp("lpips"), {}
    for trunk in ("alex", "vgg"):
        torch.save(trunk_state(trunk), root / f"{trunk}_trunk.pth")
        torch.save(lin_state(trunk), root / f"{trunk}_lin.pth")
        files[trunk] = (root / f"{trunk}_trunk.pth", root / f"{trunk}_lin.pth")
    return files


@pytest.fixture(scope="module")
def alex(weights):
    return common.load_lpips(*weights["alex"], verify=False)


def as_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- LPIPS ---------------------------------------------------------------------------------------------------
def test_parameter_counts_and_torchvision_indices():
    assert sum(w.numel() for k, w in trunk_state("alex").items() if k.startswith("features.")) == 2_469_696
    for trunk, trunk_params, lin_values in (("alex", 2_469_696, 1_152), ("vgg", 14_714_688, 1_472)):
        model = common.LPIPS(trunk)
        assert count(model.features) == trunk_params and count(model.lins) == lin_values
        expected = {k: v.shape for k, v in trunk_state(trunk).items() if k.startswith("features.")}
        assert {k: v.shape for k, v in model.features.state_dict(prefix="features.").items()} == expected
        assert not model.training and not any(p.requires_grad for p in model.parameters())


def reference_alex_lpips(state: dict, lin: dict, img0, img1) -> torch.Tensor:
    """LPIPS v0.1 (alex) written out functionally from the spec's table, independent of the module."""
    shift, scale = (torch.tensor(v).view(1, 3, 1, 1) for v in ([-0.030, -0.088, -0.188], [0.458, 0.448, 0.450]))
    conv = lambda x, i, **kw: F.relu(F.conv2d(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], **kw))
    feats = []
    for img in (img0, img1):
        x = ((2 * img - 1) - shift) / scale
        relu1 = conv(x, 0, stride=4, padding=2)
        relu2 = conv(F.max_pool2d(relu1, 3, 2), 3, padding=2)
        relu3 = conv(F.max_pool2d(relu2, 3, 2), 6, padding=1)
        relu4 = conv(relu3, 8, padding=1)
        relu5 = conv(relu4, 10, padding=1)
        feats.append([m / (m.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for m in (relu1, relu2, relu3, relu4, relu5)])
    return sum(((f0 - f1) ** 2 * lin[f"lin{i}.model.1.weight"]).sum(1).mean((1, 2))
               for i, (f0, f1) in enumerate(zip(*feats)))


def test_alex_equals_a_functional_reference(alex):
    x0 = torch.cat([as_tensor(synthetic_image(s, 70, 90)) for s in (4, 5)])
    x1 = x0.flip(-1).roll(7, -2)
    expected = reference_alex_lpips(trunk_state("alex"), lin_state("alex"), x0, x1)
    assert torch.allclose(alex(x0, x1), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("trunk", ["alex", "vgg"])
def test_slices_end_after_the_relus(trunk):
    model, h, start = common.LPIPS(trunk), torch.randn(1, 3, 64, 64), 0
    for end, channels in zip(model.cuts, LIN_CHANNELS[trunk]):
        h, start = model.features[start:end](h), end
        assert isinstance(model.features[end - 1], torch.nn.ReLU) and h.min() >= 0 and h.shape[1] == channels
    assert end == len(model.features)


def test_identity_symmetry_and_non_negativity(weights):
    x = torch.cat([as_tensor(synthetic_image(s, 64, 80)) for s in (1, 2)])    # two different images
    y = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    for trunk in ("alex", "vgg"):
        model = common.load_lpips(*weights[trunk], verify=False)
        same, d_xy, d_yx = model(x, x), model(x, y), model(y, x)
        assert same.shape == (2,) and same.abs().max() < 1e-7
        assert torch.allclose(d_xy, d_yx, rtol=1e-5, atol=1e-7) and (d_xy > 0).all()
        assert model(x, x.flip(0)).min() > 0                                  # image 0 vs image 1


@pytest.mark.parametrize("trunk", ["alex", "vgg"])
def test_more_blur_scores_worse(weights, trunk):
    model = common.load_lpips(*weights[trunk], verify=False)
    img = as_tensor(synthetic_image(3, 96, 96))
    light, heavy = (common.blur(img, common.isotropic_kernels(torch.tensor([s]))) for s in (0.8, 2.5))
    assert 0 < model(img, light).item() < model(img, heavy).item()


def test_minimum_input_size(alex, weights):
    x = torch.rand(1, 3, 31, 31)
    assert alex(x, x.flip(-1)).item() > 0
    with pytest.raises(common.UserError, match="31"):
        alex(x[..., :30, :], x[..., :30, :])
    with pytest.raises(common.UserError, match="one shape"):
        alex(x, torch.rand(1, 3, 32, 31))
    vgg = common.load_lpips(*weights["vgg"], verify=False)
    assert vgg(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)).item() > 0
    with pytest.raises(common.UserError, match="16"):
        vgg(torch.rand(1, 3, 15, 40), torch.rand(1, 3, 15, 40))
    for trunk, side in (("alex", 30), ("vgg", 15)):                          # the minimum is tight: torch fails below
        model, small = common.LPIPS(trunk), torch.rand(1, 3, side, side)
        model.min_side = 1
        with pytest.raises(RuntimeError):
            model(small, small)

def test_verify_accepts_only_the_released_sums(weights, tmp_path):
    with pytest.raises(common.UserError, match="--lpips-unverified") as err:
        common.load_lpips(*weights["alex"])
    assert "\n" not in str(err.value) and "released LPIPS v0.1 alex" in str(err.value)
    for trunk in ("alex", "vgg"):
        torch.save(lin_state(trunk, seed=5, released_sums=True), lin := tmp_path / f"{trunk}.pth")
        model = common.load_lpips(weights[trunk][0], lin)                          # verify=True
        sums = [w.sum().item() for w in model.lins.state_dict().values()]
        assert sums == pytest.approx(RELEASED_SUMS[trunk], abs=1e-4)
        assert model.trunk == trunk


def test_loaded_weights_are_the_files(weights):
    model = common.load_lpips(*weights["vgg"], verify=False)
    state, lin = trunk_state("vgg"), lin_state("vgg")
    assert torch.equal(model.features[28].weight, state["features.28.weight"])
    assert torch.equal(model.lins[4].weight, lin["lin4.model.1.weight"])


def bad_file(path, obj):
    torch.save(obj, path)
    return path


def test_weight_file_errors_are_one_line(weights, tmp_path):
    alex_trunk, alex_lin = weights["alex"]
    renamed = trunk_state("alex")
    renamed["features.4.weight"] = renamed.pop("features.3.weight")
    reshaped = lin_state("alex")
    reshaped["lin2.model.1.weight"] = torch.rand(1, 100, 1, 1)
    (garbage := tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    cases = [
        ((bad_file(tmp_path / "renamed.pth", renamed), alex_lin), ["missing features.3.weight",
                                                                   "unexpected features.4.weight"]),
        ((alex_trunk, bad_file(tmp_path / "reshaped.pth", reshaped)), ["lin2.model.1.weight", "100"]),
        ((alex_trunk, weights["vgg"][1]), ["lin1.model.1.weight", "alex"]),               # vgg lin on the alex trunk
        ((weights["vgg"][0], alex_lin), ["vgg"]),                                         # and the other way round
        ((tmp_path / "absent.pth", alex_lin), ["not found", "absent.pth"]),
        ((alex_trunk, tmp_path / "absent.pth"), ["not found", "absent.pth"]),
        ((garbage, alex_lin), ["garbage.pth"]),
        ((bad_file(tmp_path / "list.pth", [torch.zeros(1)]), alex_lin), ["list.pth"]),
        ((bad_file(tmp_path / "notensor.pth", {"features.0.weight": 3}), alex_lin), ["features.0.weight"]),
        ((bad_file(tmp_path / "conv1.pth", {"features.0.weight": torch.zeros(64, 3, 7, 7)}), alex_lin),
         ["alexnet-owt-7be5be79.pth", "vgg16-397923af.pth"]),
        ((alex_trunk, bad_file(tmp_path / "linjunk.pth", {**lin_state("alex"), "lin0.model.1.weight": "x"})), ["lin0.model.1.weight"]),
    ]
    for files, needles in cases:
        with pytest.raises(common.UserError) as err:
            common.load_lpips(*files, verify=False)
        message = str(err.value)
        assert "\n" not in message and all(n in message for n in needles), message


def test_classifier_keys_are_ignored_but_extra_feature_keys_are_not(weights, tmp_path):
    state = trunk_state("alex")
    assert "classifier.1.weight" in state and common.load_lpips(weights["alex"][0], weights["alex"][1], verify=False)
    state["features.12.weight"] = torch.zeros(1)
    with pytest.raises(common.UserError, match="unexpected features.12.weight"):
        common.load_lpips(bad_file(tmp_path / "extra.pth", state), weights["alex"][1], verify=False)


# ---- paired folders ------------------------------------------------------------------------------------------
def write(folder, name, h, w, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_image(seed, h, w)).save(folder / name)
    return folder / name


def names(pairs):
    return [(lr.name, hr.name) for lr, hr in pairs]


def test_paired_files_naming_layouts(tmp_path):
    for stem in ("a", "b"):                                                   # NTIRE2020 Track1 / AIM2019
        write(tmp_path / "track1-valid-input", f"{stem}.png", 8, 8), write(tmp_path / "track1-valid-gt", f"{stem}.png", 32, 32)
    pairs = common.paired_files(tmp_path / "track1-valid-input", tmp_path / "track1-valid-gt", 4)
    assert names(pairs) == [("a.png", "a.png"), ("b.png", "b.png")]
    for lr, hr in (("0801x4.png", "0801.png"), ("0802x4m.png", "0802.png")):   # DIV2K, NTIRE2018 letter
        write(tmp_path / "div_lr", lr, 8, 8), write(tmp_path / "div_hr", hr, 32, 32)
    assert names(common.paired_files(tmp_path / "div_lr", tmp_path / "div_hr", 4)) == [("0801x4.png", "0801.png"),
                                                                                  ("0802x4m.png", "0802.png")]
    for stem in ("Canon_001", "Nikon_002"):                                   # RealSR, LR and HR in one folder
        write(tmp_path / "realsr", f"{stem}_HR.png", 32, 32), write(tmp_path / "realsr", f"{stem}_LR4.png", 8, 8)
    pairs = common.paired_files(tmp_path / "realsr", tmp_path / "realsr", 4)
    assert names(pairs) == [("Canon_001_LR4.png", "Canon_001_HR.png"), ("Nikon_002_LR4.png", "Nikon_002_HR.png")]
    write(tmp_path / "realsr_lr", "Canon_001_LR4.png", 8, 8)                  # RealSR, separate folders
    write(tmp_path / "realsr_hr", "Canon_001_HR.png", 32, 32)
    assert names(common.paired_files(tmp_path / "realsr_lr", tmp_path / "realsr_hr", 4)) == [
        ("Canon_001_LR4.png", "Canon_001_HR.png")]


def test_paired_files_unmatched_errors(tmp_path):
    write(tmp_path / "lr", "a.png", 8, 8), write(tmp_path / "lr", "orphan.png", 8, 8)
    write(tmp_path / "hr", "a.png", 32, 32), write(tmp_path / "hr", "lonely.png", 32, 32)
    with pytest.raises(common.UserError) as err:
        common.paired_files(tmp_path / "lr", tmp_path / "hr", 4)
    message = str(err.value)
    assert "orphan.png" in message and "lonely.png" in message and "NAMEx4" in message and "_LR4" in message
    write(tmp_path / "one", "Canon_001_HR.png", 32, 32), write(tmp_path / "one", "Canon_001_LR2.png", 16, 16)
    with pytest.raises(common.UserError, match="Canon_001_LR2.png"):               # x2 LR, but --scale 4
        common.paired_files(tmp_path / "one", tmp_path / "one", 4)
    assert len(common.paired_files(tmp_path / "one", tmp_path / "one", 2)) == 1
    with pytest.raises(common.UserError, match="not found"):
        common.paired_files(tmp_path / "nowhere", tmp_path / "hr", 4)


def never_called(img_lr):
    raise AssertionError("sr_fn must not run before the sizes are checked")


def test_size_errors_come_before_any_network(tmp_path, capsys):
    write(tmp_path / "lr", "a.png", 8, 8), write(tmp_path / "hr", "a.png", 32, 32)
    write(tmp_path / "lr", "b.png", 8, 8), write(tmp_path / "hr", "b.png", 30, 32)   # too small by 2 rows
    with pytest.raises(common.UserError, match=r"32x30.*8x8.*32x32"):
        common.run_paired(never_called, tmp_path / "lr", tmp_path / "hr", 4, "cpu")
    write(tmp_path / "up", "Canon_001_HR.png", 32, 32), write(tmp_path / "up", "Canon_001_LR4.png", 32, 32)
    with pytest.raises(common.UserError, match="not smaller than its HR"):         # pre-upsampled RealSR LR
        common.run_paired(never_called, tmp_path / "up", tmp_path / "up", 4, "cpu")
    write(tmp_path / "lr4", "c.png", 8, 8), write(tmp_path / "hr4", "c.png", 35, 36)   # 3 extra px: fine; 4: not
    with pytest.raises(common.UserError, match=r"36x35.*8x8.*32x32"):
        common.run_paired(never_called, tmp_path / "lr4", tmp_path / "hr4", 4, "cpu")
    with pytest.raises(common.UserError, match="x3"):
        common.check_pair_sizes(common.paired_files(tmp_path / "lr", tmp_path / "hr", 3)[:1], 3)
    assert "never" not in capsys.readouterr().out


def nearest(img_lr):
    return F.interpolate(img_lr, scale_factor=4, mode="nearest")


def test_run_paired_metrics_lpips_and_saved_images(tmp_path, alex, capsys):
    for i, stem in enumerate(("a", "b")):                                     # HR 4x LR + 3 px: modcrop removes them
        hr = common.load_uint8(write(tmp_path / "gt", f"{stem}.png", 67, 83, seed=20 + i))
        lr = common.imresize(as_tensor(common.modcrop(hr, 4)), 1 / 4)
        common.save_image(lr, tmp_path / "track1-valid-input" / f"{stem}.png")
    rows = common.run_paired(nearest, tmp_path / "track1-valid-input", tmp_path / "gt", 4, "cpu", lpips=alex,
                             save_dir=tmp_path / "out")
    assert [r["image"] for r in rows] == ["a", "b"] and {r["set"] for r in rows} == {"track1-valid-input"}
    for row in rows:
        assert row["degradation"] == "paired"
        assert all(math.isfinite(row[m]) for m in ("psnr", "ssim", "psnr_rgb", "ssim_rgb", "lpips"))
        assert 15 < row["psnr"] < 50 and 0 < row["ssim"] <= 1 and row["lpips"] > 0
    bicubic = common.run_paired(common.bicubic_sr(4), tmp_path / "track1-valid-input", tmp_path / "gt", 4, "cpu",
                                limit=1)
    assert len(bicubic) == 1 and "lpips" not in bicubic[0]
    assert bicubic[0]["psnr"] > rows[0]["psnr"]                               # bicubic beats nearest
    saved = common.load_uint8(tmp_path / "out" / "track1-valid-input" / "a.png")
    assert saved.shape == (64, 80, 3)
    assert "track1-valid-input 2/2 b.png" in capsys.readouterr().out
    with pytest.raises(common.UserError, match="--scale"):
        common.run_paired(lambda x: F.interpolate(x, scale_factor=2), tmp_path / "track1-valid-input", tmp_path / "gt",
                      4, "cpu")


def test_run_paired_set_name_of_a_bare_scale_folder(tmp_path):
    folder = tmp_path / "Canon" / "Test" / "4"
    write(folder, "Canon_001_HR.png", 32, 32), write(folder, "Canon_001_LR4.png", 8, 8)
    rows = common.run_paired(nearest, folder, folder, 4, "cpu")
    assert rows[0]["set"] == "Test-4" and rows[0]["image"] == "Canon_001_LR4"


def test_super_resolve_folder(tmp_path, capsys, monkeypatch):
    write(tmp_path / "lr", "x.png", 12, 10), write(tmp_path / "lr" / "sub", "y.jpg", 8, 6)
    written = common.super_resolve_folder(nearest, tmp_path / "lr", tmp_path / "sr", "cpu")
    assert [p.relative_to(tmp_path / "sr").as_posix() for p in written] == ["sub/y.png", "x.png"]
    assert common.load_uint8(tmp_path / "sr" / "x.png").shape == (48, 40, 3)
    assert common.load_uint8(tmp_path / "sr" / "sub" / "y.png").shape == (32, 24, 3)
    assert "2/2" in capsys.readouterr().out
    for out in (tmp_path / "lr", tmp_path / "lr" / "sr"):
        with pytest.raises(common.UserError, match="LR folder"):
            common.super_resolve_folder(never_called, tmp_path / "lr", out, "cpu")
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(type(tmp_path), "touch", refuse)                     # the probe, before any image
    with pytest.raises(common.UserError, match="cannot write .*Permission denied"):
        common.super_resolve_folder(never_called, tmp_path / "lr", tmp_path / "sr2", "cpu")
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    with pytest.raises(common.UserError, match="cannot write"):
        common.super_resolve_folder(never_called, tmp_path / "lr", tmp_path / "file" / "sr", "cpu")


def test_paired_args_and_help():
    parser = argparse.ArgumentParser()
    common.add_paired_args(parser)
    args = parser.parse_args(["--lr-dir", "L", "--lpips-weights", "t.pth", "l.pth", "--lpips-unverified"])
    assert (args.lr_dir, args.hr_dir, args.lpips_weights, args.lpips_unverified) == ("L", None, ["t.pth", "l.pth"], True)
    assert parser.parse_args([]).lpips_unverified is False
    text = " ".join(parser.format_help().split())
    assert "TRUNK LIN" in text and "alexnet-owt-7be5be79.pth" in text and "vgg16-397923af.pth" in text
    assert text.count("(default:") == 4

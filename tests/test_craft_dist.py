"""craft_dist.py: Fréchet distance, Eq. 4 weights, bin sampling, Eq. 2 degradation, φ loader, CLI end to end."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from PIL import Image

import common
import craft_dist as cd
from conftest import REPO, synthetic_image

EDGES = (cd.Config.sigma_edges, cd.Config.noise_edges, cd.Config.quality_edges)
SHAPE = (5, 5, 3)
# torchvision AlexNet state dict (independent of our module definition)
ALEXNET_SHAPES = {"features.0.weight": (64, 3, 11, 11), "features.0.bias": (64,),
                  "features.3.weight": (192, 64, 5, 5), "features.3.bias": (192,),
                  "features.6.weight": (384, 192, 3, 3), "features.6.bias": (384,),
                  "features.8.weight": (256, 384, 3, 3), "features.8.bias": (256,),
                  "features.10.weight": (256, 256, 3, 3), "features.10.bias": (256,),
                  "classifier.1.weight": (4096, 9216), "classifier.1.bias": (4096,),
                  "classifier.4.weight": (4096, 4096), "classifier.4.bias": (4096,),
                  "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,)}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def img_stack(seeds, size):
    return torch.stack([torch.from_numpy(synthetic_image(s, size, size)) for s in seeds]).permute(0, 3, 1, 2) / 255.0


@pytest.fixture(scope="module")
def alexnet():
    """The random-init AlexNet φ (seed 0), built once: 61 M parameters take a while to initialise."""
    return cd.build_phi("alexnet")


# ---- networks --------------------------------------------------------------------------------------------
def test_parameter_counts_and_shapes(alexnet):
    alex = alexnet
    assert n_params(cd.MSRResNet()) == 1_517_571
    assert n_params(cd.RRDBNet()) == 16_697_987
    assert n_params(alex) == 61_100_840
    assert n_params(cd.VGG19Phi(35)) == 20_024_384
    with torch.no_grad():
        assert alex(torch.rand(2, 3, 72, 72)).shape == (2, 4096)
        assert cd.VGG19Phi(8)(torch.rand(2, 3, 72, 72)).shape == (2, 128)
        assert cd.MSRResNet(16, 2)(torch.rand(1, 3, 12, 10)).shape == (1, 3, 48, 40)
        assert cd.RRDBNet(16, 1, 8)(torch.rand(1, 3, 12, 10)).shape == (1, 3, 48, 40)
    # random φ is fixed by seed 0 and does not disturb the global RNG
    state = torch.get_rng_state()
    vgg = cd.build_phi("vgg19-2_2")
    assert torch.equal(vgg.features[0].weight, cd.build_phi("vgg19-2_2").features[0].weight)
    assert torch.equal(torch.get_rng_state(), state)


def test_basicsr_init_statistics():
    """MSRResNet: every conv W ~ Kaiming normal (std √(2 / fan_in)) x 0.1, bias 0; RRDBNet: only the dense blocks'."""
    torch.manual_seed(0)
    for name, module in cd.MSRResNet().requires_grad_(False).named_modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.weight[0].numel()
            assert float(module.weight.std()) == pytest.approx(0.1 * math.sqrt(2 / fan_in), rel=0.1), name
            assert abs(float(module.weight.mean())) < 0.1 * 0.1 * math.sqrt(2 / fan_in), name
            assert torch.count_nonzero(module.bias) == 0, name
    rrdb = cd.RRDBNet(64, 1, 32).requires_grad_(False)
    conv5 = rrdb.body[0].rdb2.conv5
    assert float(conv5.weight.std()) == pytest.approx(0.1 * math.sqrt(2 / conv5.weight[0].numel()), rel=0.1)
    assert torch.count_nonzero(conv5.bias) == 0
    first = rrdb.conv_first                                     # PyTorch default: U(±1/√fan_in), std 1/√(3 fan_in)
    assert float(first.weight.std()) == pytest.approx(1 / math.sqrt(3 * 27), rel=0.1) and first.bias.abs().sum() > 0


def test_untrained_msrresnet_is_close_to_bilinear_upsampling():
    """The residual branch starts ~0 (Kaiming x 0.1 in every conv): output ≈ the bilinear x4 it adds."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 24, 20)
    bilinear = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
    with torch.no_grad():
        gap = (cd.MSRResNet()(x) - bilinear).abs().max()
        default = torch.nn.Conv2d(64, 3, 3, 1, 1)                   # PyTorch's default init of the last conv alone
        net = cd.MSRResNet()
        net.conv_last = default
        gap_default = (net(x) - bilinear).abs().max()
    assert float(gap) < 1e-3 < float(gap_default)


# ---- Fréchet distance [Eq. 3] ----------------------------------------------------------------------------
def features_with_diag_cov(n, variances, mean, seed):
    """n samples whose unbiased sample covariance is exactly diag(variances) and mean exactly `mean`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, len(variances)))
    q, _ = np.linalg.qr(x - x.mean(0))                     # orthonormal columns, each orthogonal to 1
    return torch.tensor(q * np.sqrt(np.asarray(variances) * (n - 1)) + mean)


def test_frechet_identical_is_zero():
    feats = torch.randn(30, 60, generator=torch.Generator().manual_seed(0))
    assert cd.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)
    mu, cov = feats.double().mean(0).numpy(), np.cov(feats.double().numpy(), rowvar=False)
    assert cd.frechet_distance_gaussians(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-7 * np.trace(cov))


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    closed = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert cd.frechet_distance_gaussians(mu_a, np.diag(a), mu_b, np.diag(b)) == pytest.approx(closed, rel=1e-10)
    fa, fb = features_with_diag_cov(40, a, mu_a, 2), features_with_diag_cov(30, b, mu_b, 3)
    assert cd.frechet_distance(fa, fb) == pytest.approx(closed, rel=1e-9)


@pytest.mark.parametrize("n,c", [(80, 12), (20, 60)])
def test_frechet_sample_space_matches_sqrtm(n, c):
    gen = torch.Generator().manual_seed(c)
    fa = torch.randn(n, c, generator=gen).double() @ torch.randn(c, c, generator=gen).double() * 0.3
    fb = torch.randn(n + 5, c, generator=gen).double() + 0.5
    ref = cd.frechet_distance_gaussians(fa.mean(0), np.cov(fa.numpy(), rowvar=False),
                                        fb.mean(0), np.cov(fb.numpy(), rowvar=False))
    assert cd.frechet_distance(fa, fb) == pytest.approx(ref, rel=1e-5)


def test_frechet_rank_deficient_is_finite_and_real(alexnet):
    with torch.no_grad():
        fa, fb = alexnet(torch.rand(6, 3, 72, 72)), alexnet(torch.rand(9, 3, 72, 72) * 0.5)  # n << c = 4096
    d = cd.frechet_distance(fa, fb)
    assert isinstance(d, float) and math.isfinite(d) and d > 0
    # zero covariance on one side (all rows identical): D = ‖Δμ‖² + tr Σ_b exactly
    same = fa[:1].repeat(5, 1)
    expect = float((same[0].double() - fb.double().mean(0)).pow(2).sum() + fb.double().var(0).sum())
    assert cd.frechet_distance(same, fb) == pytest.approx(expect, rel=1e-9)


# ---- weights [Eq. 4] -------------------------------------------------------------------------------------
def test_weights_properties():
    d = torch.rand(75, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 7 + 2
    entropies = []
    for alpha in (0, 1, 5, 25, 100):
        w = cd.bin_weights(d, alpha)
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-12) and bool((w >= 0).all())
        entropies.append(float(-(w[w > 0] * w[w > 0].log()).sum()))
        if alpha > 0:
            assert int(w.argmax()) == int(d.argmin()) and float(w[d.argmax()]) == 0.0
    assert torch.allclose(cd.bin_weights(d, 0), torch.full((75,), 1 / 75, dtype=torch.float64))
    assert entropies[0] == pytest.approx(math.log(75)) and all(np.diff(entropies) < 0)
    assert torch.allclose(cd.bin_weights(torch.full((75,), 3.0), 25), torch.full((75,), 1 / 75, dtype=torch.float64))
    # with α = 25 a bin at D_norm = 0.1 gets ~4 % of the nearest bin's weight (spec §4)
    w = cd.bin_weights(torch.tensor([0.0, 0.1, 1.0]), 25)
    assert float(w[1] / w[0]) == pytest.approx((math.exp(0.9**25) - 1) / (math.e - 1))


# ---- binning and sampling [Sec. 3.3] ---------------------------------------------------------------------
def test_sampled_parameters_fall_inside_their_bin():
    gen = torch.Generator().manual_seed(0)
    bins = cd.sample_bins(torch.rand(75, generator=gen), 3000, gen)
    params = cd.sample_in_bins(bins, EDGES, gen)
    i_s, i_l, i_q = np.unravel_index(bins.numpy(), SHAPE)
    for key, idx, edges in (("sigma", i_s, EDGES[0]), ("noise", i_l, EDGES[1]), ("quality", i_q, EDGES[2])):
        e = np.asarray(edges)
        v = params[key].double().numpy()
        assert ((v >= e[idx]) & (v <= e[idx + 1])).all()
    assert params["quality"].dtype == torch.int64
    assert set(np.unique(i_q)) == {0, 1, 2} and params["quality"].min() >= 30 and params["quality"].max() <= 90
    box = cd.make_sampler(cd.Config(), oracle_setting=3)[0](500, gen)
    assert float(box["sigma"].min()) >= 1.5 and float(box["sigma"].max()) <= 2.5
    assert int(box["quality"].min()) >= 75 and int(box["quality"].max()) <= 85


def test_empirical_bin_frequencies_match_weights():
    gen = torch.Generator().manual_seed(1)
    w = torch.distributions.Dirichlet(torch.ones(75)).sample().double()
    w = cd.bin_weights(-w.log(), 3)                                  # a peaked, realistic weight vector
    n = 40_000
    counts = np.bincount(cd.sample_bins(w, n, gen).numpy(), minlength=75)
    expected = w.numpy() * n
    keep = expected > 5
    stat, p = scipy.stats.chisquare(counts[keep], expected[keep] * counts[keep].sum() / expected[keep].sum())
    assert p > 1e-3, (stat, p)
    assert counts[~keep].sum() < 5 * max(1, (~keep).sum())


# ---- degradation [Eq. 2] ---------------------------------------------------------------------------------
def test_degradation_shapes_identity_and_equivalence():
    img = img_stack([1, 2, 3], 288)[..., :280]                        # non-square on purpose
    sigma = torch.tensor([0.0, 1.7, 4.9])
    fused = cd.blur_downsample(img, cd.gaussian_kernels_1d(sigma, 31), 4)
    assert fused.shape == (3, 3, 72, 70)
    assert torch.allclose(fused[0], common.imresize(img[:1], 1 / 4)[0], atol=1e-6)          # σ = 0: no blur
    ref = common.imresize(common.blur(img[1:], common.isotropic_kernels(sigma[1:], 31)), 1 / 4)
    assert torch.allclose(fused[1:], ref, atol=1e-5)                  # = common 31x31 blur -> MATLAB bicubic
    params = {"sigma": sigma, "noise": torch.tensor([0.0, 10.0, 50.0]), "quality": torch.tensor([90, 50, 30])}
    img_lr = cd.degrade(img, params, 4, 31, generator=torch.Generator().manual_seed(0))
    assert img_lr.shape == (3, 3, 72, 70)
    assert torch.equal(img_lr, (img_lr * 255).round() / 255)         # 8-bit values
    again = cd.degrade(img, params, 4, 31, generator=torch.Generator().manual_seed(0))
    assert torch.equal(img_lr, again)
    # no blur, no noise: only JPEG separates the output from the 8-bit bicubic LR, more so at low q
    clean = common.quantize(common.imresize(img[:1], 1 / 4))
    errors = [float((cd.degrade(img[:1], {"sigma": torch.zeros(1), "noise": torch.zeros(1),
                                          "quality": torch.tensor([q])}, 4, 31) - clean).abs().mean())
              for q in (95, 70, 30)]
    assert 0 < errors[0] < errors[1] < errors[2]
    gray = cd.degrade(img[:1], {k: v[2:] for k, v in params.items()} | {"quality": torch.tensor([100])}, 4, 31,
                      gray_noise=True, generator=torch.Generator().manual_seed(0))
    assert gray.shape == (1, 3, 72, 70)


def test_each_training_sample_is_degraded_alike_with_any_number_of_processes():
    """Bins, (σ, l, q), noise fields and so JPEG are a function of (seed, step, global sample index), not of the rank:
    rank r of N degrades samples r·B/N … of step k exactly as one process degrades them."""
    img_hr = img_stack(range(4), 64)
    for cfg, oracle in ((cd.make_config("smoke"), None), (cd.make_config("smoke", gray_noise=True), 4)):
        sampler = cd.make_sampler(cfg, oracle_setting=oracle)[0]
        one = cd.train_step_lr(img_hr, sampler, common.StepRandom(0, 5, 4, common.Dist(), "cpu"), cfg)
        for world in (2, 4):
            b = 4 // world
            ranks = [common.StepRandom(0, 5, 4, common.Dist(r, world), "cpu") for r in range(world)]
            parts = [cd.train_step_lr(img_hr[r * b:(r + 1) * b], sampler, rnd, cfg) for r, rnd in enumerate(ranks)]
            assert torch.equal(one, torch.cat(parts)), (oracle, world)
        assert not torch.equal(one, cd.train_step_lr(img_hr, sampler, common.StepRandom(0, 6, 4, common.Dist(), "cpu"),
                                                     cfg))                     # another step, other draws


def test_recovery_of_a_hidden_bin(alexnet):
    """References = Y_w degraded with fresh draws from the hidden bin (1, 0, 2) (σ∈[1,2], l∈[0,10], q∈[70,90],
    next to setting ③); random AlexNet φ, n = 32, seed 0 (spec §7.1: this corner bin ranks 1st)."""
    hidden = (1, 0, 2)
    b = int(np.ravel_multi_index(hidden, SHAPE))
    cfg = cd.make_config("paper", n_clean=32)
    clean = img_stack(range(100, 132), 288)
    gen = torch.Generator().manual_seed(12345)
    img_ref = cd.degrade(clean, cd.sample_in_bins(torch.full((32,), b), EDGES, gen), 4, 31, generator=gen)
    phi = alexnet
    w = cd.bin_weights(cd.bin_distances(phi, clean, cd.features(phi, img_ref, "cpu"), cfg, "cpu"), 25)
    rank = int((torch.argsort(w, descending=True) == b).nonzero()) + 1
    near = float(w.reshape(SHAPE)[0:3, 0:2, 1:3].sum())               # the hidden bin and its neighbours
    print(f"hidden bin {hidden}: rank {rank}, weight {float(w[b]):.3f}, mass within ±1 bin {near:.3f}")
    assert rank <= 3
    assert near > 0.5                                                  # uniform would give 12/75 = 0.16


# ---- official weights (φ loader, BasicSR SR loader) ------------------------------------------------------
def test_phi_weights_loader(tmp_path, alexnet):
    gen = torch.Generator().manual_seed(5)
    state = {k: torch.randn(s, generator=gen) * 0.01 for k, s in ALEXNET_SHAPES.items()}
    torch.save(state, tmp_path / "alexnet.pth")
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    x = torch.rand(2, 3, 72, 72)
    with torch.no_grad():
        loaded = cd.build_phi("alexnet", tmp_path / "alexnet.pth")
        assert not torch.allclose(loaded(x), alexnet(x))
        assert torch.equal(loaded.classifier[4].weight, state["classifier.4.weight"])
        assert torch.equal(cd.build_phi("alexnet", tmp_path / "wrapped.pth")(x), loaded(x))
    bad = {k: v for k, v in state.items() if k != "features.3.bias"}
    bad.update({"features.99.weight": torch.zeros(1), "features.0.weight": torch.zeros(64, 3, 7, 7)})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(common.UserError) as err:
        cd.build_phi("alexnet", tmp_path / "bad.pth")
    for problem in ("missing (1): features.3.bias", "unexpected (1): features.99.weight",
                    "shape mismatch (1): features.0.weight (64, 3, 7, 7) vs ours (64, 3, 11, 11)"):
        assert problem in str(err.value)
    with pytest.raises(common.UserError, match="not found"):
        cd.build_phi("alexnet", tmp_path / "absent.pth")


def test_basicsr_sr_loader(tmp_path):
    net = cd.MSRResNet(16, 3)
    torch.save({"params": net.state_dict()}, tmp_path / "msr.pth")
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(cd.load_basicsr_sr(tmp_path / "msr.pth")(x), net(x))
        rrdb = cd.RRDBNet(16, 2, 8)
        torch.save({"params_ema": rrdb.state_dict()}, tmp_path / "rrdb.pth")
        assert torch.equal(cd.load_basicsr_sr(tmp_path / "rrdb.pth")(x), rrdb(x))
    torch.save({"params": {**net.state_dict(), "extra.weight": torch.zeros(2)}}, tmp_path / "bad.pth")
    with pytest.raises(common.UserError, match="unexpected"):
        cd.load_basicsr_sr(tmp_path / "bad.pth")


# ---- CLI end to end --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    for i in range(4):
        Image.fromarray(synthetic_image(200 + i, 300, 300)).save(root / f"c{i}.png")
    return root


def train_args(out, data, *extra):
    return ["train", "--preset", "smoke", "--data-dir", str(data), "--out-dir", str(out), "--device", "cpu",
            "--workers", "0", "--log-every", "1", *extra]


def last_log(out):
    return json.loads((Path(out) / "log.jsonl").read_text().splitlines()[-1])


@pytest.fixture(scope="module")
def photos_64(tmp_path_factory):
    """<root>/Photos/HR: four 80x64 photos (width x height), the smallest the smoke preset takes; the folder is the
    clean set, the training set and (as benchmark 'Photos' under <root>) the test set."""
    root = tmp_path_factory.mktemp("photos64")
    (root / "Photos" / "HR").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(synthetic_image(300 + i, 64, 80)).save(root / "Photos" / "HR" / f"p{i}.png")
    return root


def test_smoke_chain_on_64px_photos(tmp_path, photos_64, capsys):
    """refs -> weights -> train -> eval with --preset smoke on photos whose shorter side is 64 px: LR 16, HR crops 64,
    φ = vgg19-2_2 (AlexNet needs 63 px); the paper preset keeps 72 / 288 / AlexNet."""
    paper, smoke = cd.make_config("paper"), cd.make_config("smoke")
    assert (paper.lr_size, paper.hr_patch, paper.phi) == (72, 288, "alexnet") and cd.PRESETS["paper"] == {}
    assert (smoke.lr_size, smoke.hr_patch, smoke.phi) == (16, 64, "vgg19-2_2")
    photos, refs = photos_64 / "Photos" / "HR", tmp_path / "refs"
    cd.main(["refs", "--preset", "smoke", "--clean-dir", str(photos), "--setting", "3", "--n", "6",
             "--out-dir", str(refs), "--device", "cpu"])
    assert len(list(refs.glob("*.png"))) == 6 and Image.open(refs / "ref0000.png").size == (16, 16)
    assert f"wrote 6 references of 16x16 to {refs}" in capsys.readouterr().out
    out = tmp_path / "w" / "weights.json"
    cd.main(["weights", "--preset", "smoke", "--ref-dir", str(refs), "--clean-dir", str(photos),
             "--alpha", "25", "--out", str(out), "--device", "cpu", "--sigma-edges", "0", "2.5", "5",
             "--noise-edges", "0", "25", "50", "--quality-edges", "30", "60", "90"])    # 2 x 2 x 2 bins: fast
    data = json.loads(out.read_text())
    assert len(data["weights"]) == 8 and len(data["distances"]) == 8 and data["shape"] == [2, 2, 2]
    assert sum(data["weights"]) == pytest.approx(1) and min(data["weights"]) == 0.0
    assert data["quality_edges"] == [30, 60, 90] and data["n_ref"] == 6 and data["n_clean"] == 6
    assert data["phi"] == "vgg19-2_2"
    assert Image.open(out.with_suffix(".png")).size == (2 * 2 * 24 + 8, 2 * 24)
    run = tmp_path / "sr"
    cd.main(train_args(run, photos, "--weights", str(out)))
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["weights"] == pytest.approx(data["weights"])
    assert ckpt["edges"][1] == [0, 25, 50] and ckpt["config"]["hr_patch"] == 64  # training samples the file's bins
    assert math.isfinite(last_log(run)["loss"])
    ev = tmp_path / "eval"
    cd.main(["eval", "--ckpt", str(run / "last.pt"), "--data", "Photos", "--data-root", str(photos_64),
             "--settings", "1", "3", "--out-dir", str(ev), "--device", "cpu", "--save-images"])
    md = (ev / "results.md").read_text()
    assert "setting1" in md and "setting3" in md and "### bicubic" in md and "msrresnet step 4" in md
    assert "PSNR RGB SSIM RGB" in capsys.readouterr().out
    assert Image.open(ev / "images" / "Photos" / "setting3" / "p0.png").size == (80, 64)
    cd.main(["eval", "--ckpt", str(run / "last.pt"), "--data", "Photos", "--data-root", str(photos_64),
             "--settings", "--protocol", "bicubic", "--out-dir", str(tmp_path / "ev2"), "--device", "cpu"])
    assert "| Photos | bicubic |" in (tmp_path / "ev2" / "results.md").read_text()


def test_images_too_small_for_phi_or_preset_are_refused_in_one_line(tmp_path, photos_64, alexnet):
    """Each φ states the smallest side it takes (AlexNet 63, VGG_{2,2} 2, VGG_{5,4} 16) and `weights` refuses a preset
    whose LR size is smaller; every size in a message is width x height."""
    with torch.no_grad():
        for phi in (alexnet, cd.VGG19Phi(8), cd.VGG19Phi(35)):
            phi(torch.rand(1, 3, phi.min_side, phi.min_side))
            with pytest.raises(RuntimeError):
                phi(torch.rand(1, 3, phi.min_side - 1, phi.min_side - 1))
    assert (alexnet.min_side, cd.VGG19Phi(8).min_side, cd.VGG19Phi(35).min_side) == (63, 2, 16)
    photos = photos_64 / "Photos" / "HR"
    weights = ["weights", "--preset", "smoke", "--clean-dir", str(photos), "--device", "cpu", "--out",
               str(tmp_path / "w.json")]
    with pytest.raises(SystemExit) as err:
        cd.main([*weights, "--ref-dir", str(photos), "--phi", "alexnet"])
    assert str(err.value) == ("error: --phi alexnet needs LR images of at least 63x63; --preset smoke uses 16x16: "
                              "choose --phi vgg19-2_2 or --preset paper (72x72 LR, photos >= 288 px)")
    assert not (tmp_path / "w.json").exists()
    (tmp_path / "refs").mkdir()
    Image.fromarray(synthetic_image(0, 12, 20)).save(tmp_path / "refs" / "small.png")    # 20 wide, 12 high
    with pytest.raises(SystemExit, match=r"^error: reference .*small.png is 20x12; need at least 16x16$"):
        cd.main([*weights, "--ref-dir", str(tmp_path / "refs")])
    with pytest.raises(SystemExit, match=r"^error: .*p0.png is 80x64, smaller than the 288x288 clean crop"):
        cd.main(["refs", "--clean-dir", str(photos), "--setting", "1", "--out-dir", str(tmp_path / "r")])  # paper


def test_encoder_phi_from_kdsr_and_redsr_checkpoints(tmp_path, clean_dir, tiny_hr_dir):
    """--phi encoder:CKPT (the DASR-row analogue): φ is the other script's degradation representation."""
    import kdsr
    import redsr
    smoke = ["--preset", "smoke", "--device", "cpu", "--workers", "0", "--data-dir", str(tiny_hr_dir), "--steps", "2"]
    teacher = kdsr.main(["train", "--stage", "teacher", "--out-dir", str(tmp_path / "kt"), *smoke])
    student = kdsr.main(["train", "--stage", "student", "--teacher-ckpt", str(teacher), "--out-dir",
                         str(tmp_path / "ks"), *smoke])
    redsr.main(["train", "--out-dir", str(tmp_path / "r"), *smoke])
    x = img_stack([1, 2], cd.make_config("smoke").lr_size)                    # the smoke preset's 16x16 LR
    for ckpt, script in ((student, "kdsr"), (tmp_path / "r" / "last.pt", "redsr")):
        module = __import__(script)
        args = SimpleNamespace(ckpt=ckpt, official_weights=None, scale=4, channels_last=False)
        net, cfg = module.load_for_inference(args, "cpu")[:2]
        phi = cd.build_phi(f"encoder:{ckpt}")
        with torch.no_grad():
            expected = net.estimate(x)[1] if script == "kdsr" else net.represent(x)
            assert torch.equal(phi(x), expected)                                   # D′ (4C) or f (C)
        assert phi(x).shape == (2, 4 * cfg.n_feats if script == "kdsr" else cfg.rep_dim)
        out = tmp_path / script / "weights.json"
        cd.main(["weights", "--preset", "smoke", "--ref-dir", str(tiny_hr_dir), "--clean-dir", str(clean_dir),
                 "--phi", f"encoder:{ckpt}", "--out", str(out), "--device", "cpu", "--sigma-edges", "0", "2.5", "5",
                 "--noise-edges", "0", "25", "50", "--quality-edges", "30", "60", "90"])
        data = json.loads(out.read_text())
        assert data["phi"] == f"encoder:{ckpt}" and sum(data["weights"]) == pytest.approx(1)
        assert all(math.isfinite(d) and d >= 0 for d in data["distances"])
    with pytest.raises(common.UserError, match="expected a kdsr.py student or redsr.py checkpoint"):
        cd.build_phi(f"encoder:{tmp_path / 'missing.pt'}")
    with pytest.raises(common.UserError, match="teacher"):
        cd.build_phi(f"encoder:{teacher}")
    with pytest.raises(common.UserError, match="brings its own weights"):
        cd.build_phi(f"encoder:{student}", tmp_path / "alexnet.pth")


def test_resume_continues_identically(tmp_path, tiny_hr_dir):
    cd.main(train_args(tmp_path / "full", tiny_hr_dir))                          # uniform baseline, 4 steps
    cd.main(train_args(tmp_path / "half", tiny_hr_dir, "--steps", "2"))
    cd.main(train_args(tmp_path / "half", tiny_hr_dir, "--resume", "--steps", "4"))
    full, half = last_log(tmp_path / "full"), last_log(tmp_path / "half")
    assert full["step"] == half["step"] == 4 and full["loss"] == half["loss"]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "half" / "last.pt", weights_only=True)
    assert all(torch.equal(a[part][k], b[part][k]) for part in ("model", "ema") for k in a[part])   # and the EMA


def test_resume_keeps_the_runs_config_and_distribution(tmp_path, tiny_hr_dir):
    """--resume takes preset, arch and the crafted weights from the checkpoint, not from the (omitted) flags."""
    (tmp_path / "w.json").write_text(json.dumps({"weights": [0.0, 0.0, 1.0, 0.0], "sigma_edges": [0, 1, 2],
                                                  "noise_edges": [0, 5, 10], "quality_edges": [30, 90]}))
    run = train_args(tmp_path / "full", tiny_hr_dir, "--weights", str(tmp_path / "w.json"))
    cd.main(run)
    cd.main([*train_args(tmp_path / "half", tiny_hr_dir, "--weights", str(tmp_path / "w.json")), "--steps", "2"])
    cd.main(["train", "--data-dir", str(tiny_hr_dir), "--out-dir", str(tmp_path / "half"), "--device", "cpu",
             "--workers", "0", "--log-every", "1", "--resume", "--steps", "4"])  # no --preset, no --weights
    full, half = (torch.load(tmp_path / r / "last.pt", weights_only=True) for r in ("full", "half"))
    assert half["step"] == 4 and half["config"] == full["config"] and half["weights"] == [0.0, 0.0, 1.0, 0.0]
    assert last_log(tmp_path / "full")["loss"] == last_log(tmp_path / "half")["loss"]
    assert all(torch.equal(full["model"][k], half["model"][k]) for k in full["model"])
    with pytest.raises(SystemExit, match=r"^error: .*last.pt is already at step 4 of 4: give --steps N > 4$"):
        cd.main(train_args(tmp_path / "half", tiny_hr_dir, "--resume"))


def test_cli_errors(tmp_path, tiny_hr_dir):
    (tmp_path / "w.json").write_text(json.dumps({"weights": [1.0], "sigma_edges": [0, 1, 2], "noise_edges": [0, 1],
                                                  "quality_edges": [30, 90]}))
    with pytest.raises(SystemExit, match="error: .*need 2 non-negative weights"):
        cd.main(train_args(tmp_path / "x", tiny_hr_dir, "--weights", str(tmp_path / "w.json")))
    with pytest.raises(SystemExit, match="error: eval needs --ckpt"):
        cd.main(["eval", "--device", "cpu"])
    common.save_checkpoint(tmp_path / "other.pt", {"script": "kdsr", "stage": "teacher"})
    with pytest.raises(SystemExit, match="error: .*kdsr"):
        cd.main(["eval", "--ckpt", str(tmp_path / "other.pt"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="error: .*smaller than the 288x288 clean crop"):
        cd.main(["weights", "--ref-dir", str(tiny_hr_dir), "--clean-dir", str(tiny_hr_dir), "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"error: --bin \[0, 5, 0\] is outside the bin grid \(5, 5, 3\)"):
        cd.main(["refs", "--clean-dir", str(tiny_hr_dir), "--bin", "0", "5", "0", "--out-dir", str(tmp_path / "r")])


def test_script_shape():
    text = Path(cd.__file__).read_text()
    assert len(text.splitlines()) <= 1000
    banners = [f"# ---- {i}. {name}" for i, name in enumerate(
        ["Config", "Degradation", "Networks", "Losses", "Training", "Evaluation", "Official weights", "CLI"], 1)]
    positions = [text.index(b) for b in banners]
    assert positions == sorted(positions)


# ---- robustness: signals, non-finite loss, tiles, scale, foreign checkpoints, torchrun -------------------
def test_signal_stops_cleanly_and_resume_is_exact(tmp_path, tiny_hr_dir, monkeypatch, capsys):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    log = common.RunLog.log

    def log_then_sigterm(self, step, stage, **scalars):
        log(self, step, stage, **scalars)
        if step == 3:                                                 # not a periodic save step (smoke: every 2)
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        monkeypatch.setattr(common.RunLog, "log", log_then_sigterm)
        with pytest.raises(SystemExit) as exit_info:                 # smoke: 4 steps; 128 + SIGTERM
            cd.main(train_args(tmp_path / "cut", tiny_hr_dir))
        assert exit_info.value.code == 143
        assert all(signal.getsignal(sig) is h for sig, h in handlers.items())   # the script restores them
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert f"stopped by signal at step 3; checkpoint {tmp_path / 'cut' / 'last.pt'}; continue with --resume" in out
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["step"] == 3
    cd.main(train_args(tmp_path / "cut", tiny_hr_dir, "--resume"))
    cd.main(train_args(tmp_path / "full", tiny_hr_dir))
    cut, full = last_log(tmp_path / "cut"), last_log(tmp_path / "full")
    assert cut["step"] == full["step"] == 4 and cut["loss"] == full["loss"]
    a = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    assert a["step"] == 4 and all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


def test_non_finite_loss_stops_before_the_checkpoint(tmp_path, tiny_hr_dir, monkeypatch):
    step_lr, nan = cd.train_step_lr, {"step": 1, "calls": 0}

    def nan_at_step(img_hr, sampler, rnd, cfg):                       # call k of a fresh run = step k
        nan["calls"] += 1
        return step_lr(img_hr, sampler, rnd, cfg) * (float("nan") if nan["calls"] == nan["step"] else 1.0)

    monkeypatch.setattr(cd, "train_step_lr", nan_at_step)
    with pytest.raises(SystemExit) as err:
        cd.main(train_args(tmp_path / "first", tiny_hr_dir))
    assert str(err.value).startswith("error: loss became nan at step 1; stopped. The last good checkpoint is "
                                     "(none written yet)") and "\n" not in str(err.value)
    nan.update(step=3, calls=0)                                      # smoke saves every 2 steps
    last = tmp_path / "nan" / "last.pt"
    with pytest.raises(SystemExit) as err:
        cd.main(train_args(tmp_path / "nan", tiny_hr_dir))
    assert str(err.value).startswith(f"error: loss became nan at step 3; stopped. The last good checkpoint is {last}")
    ckpt = common.load_checkpoint(last, "craft_dist", ("sr",))
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.fixture(scope="module")
def smoke_ckpt(tmp_path_factory, tiny_hr_dir):
    out = tmp_path_factory.mktemp("smoke_sr")
    cd.main(train_args(out, tiny_hr_dir, "--log-every", "100"))
    return out / "last.pt"


def eval_args(ckpt, root, out, *extra):
    return ["eval", "--ckpt", str(ckpt), "--data", "Tiny", "--data-root", str(root), "--settings", "1", "4",
            "--out-dir", str(out), "--device", "cpu", *extra]


def test_tiled_eval(tmp_path, smoke_ckpt, tiny_bench_root):
    """Tiny HR 48x64 -> LR 12x16: tile 16 is one tile (exactly the whole image); tile 4 with 2 px overlap runs."""
    results = {}
    for name, extra in (("whole", ()), ("one", ("--tile", "16")), ("small", ("--tile", "4", "--tile-overlap", "2"))):
        cd.main(eval_args(smoke_ckpt, tiny_bench_root, tmp_path / name, *extra))
        with open(tmp_path / name / "results.csv") as f:
            results[name] = [r for r in csv.DictReader(f) if not r["method"].startswith("bicubic")]
    assert results["one"][0]["method"].startswith("craft_dist msrresnet step 4 EMA tile 16")
    strip = lambda rows: [(r["degradation"], r["psnr"], r["ssim"]) for r in rows]          # noqa: E731
    assert strip(results["one"]) == strip(results["whole"]) and len(results["whole"]) == 3
    assert len(results["small"]) == 3 and all(math.isfinite(float(r["psnr"])) for r in results["small"])
    assert strip(results["small"]) != strip(results["whole"])       # 2 px overlap < the smoke net's receptive field
    with pytest.raises(SystemExit, match="^2$"):  # argparse usage error: expected int >= 0
        cd.main(eval_args(smoke_ckpt, tiny_bench_root, tmp_path / "neg", "--tile", "-1"))


def model_psnrs(ckpt, root, out, *flags) -> list[float]:
    """`eval --limit 1` of a checkpoint: the PSNR of each of the model's rows (the bicubic rows left out)."""
    cd.main(eval_args(ckpt, root, out, "--limit", "1", *flags))
    with open(out / "results.csv") as f:
        return [float(r["psnr"]) for r in csv.DictReader(f) if not r["method"].startswith("bicubic")]


def test_eval_with_channels_last_gives_the_same_scores(tmp_path, smoke_ckpt, tiny_bench_root):
    plain, nhwc = (model_psnrs(smoke_ckpt, tiny_bench_root, tmp_path / name, *flags)
                   for name, flags in (("plain", []), ("nhwc", ["--channels-last"])))
    assert len(plain) == 3 and nhwc == pytest.approx(plain, abs=1e-4)


def test_wrong_scale_and_foreign_checkpoints(tmp_path, smoke_ckpt, tiny_bench_root, tiny_hr_dir):
    with pytest.raises(SystemExit, match=r"^error: .*last\.pt is a x4 model but --scale 2 was given: use --scale 4$"):
        cd.main(eval_args(smoke_ckpt, tiny_bench_root, tmp_path / "ev", "--scale", "2"))
    assert not (tmp_path / "ev").exists()                             # stopped before anything ran
    torch.save({"params": cd.MSRResNet(16, 2).state_dict()}, tmp_path / "basicsr.pth")
    with pytest.raises(SystemExit, match="error: .*basicsr.pth is a x4 model but --scale 3"):
        cd.main(["eval", "--official-weights", str(tmp_path / "basicsr.pth"), "--scale", "3", "--device", "cpu"])
    common.save_checkpoint(tmp_path / "other.pt", {"script": "other", "stage": "x", "step": 1, "model": {}})
    common.save_checkpoint(tmp_path / "stage.pt", {"script": "craft_dist", "stage": "x", "step": 1, "model": {}})
    cases = [(["eval", "--ckpt", str(tmp_path / "other.pt")], "other.pt was written by other.py, not craft_dist.py"),
             (["eval", "--ckpt", str(tmp_path / "stage.pt")], "stage.pt is a 'x' checkpoint; expected stage sr"),
             (train_args(tmp_path / "r", tiny_hr_dir, "--resume", str(tmp_path / "other.pt")), "written by other.py"),
             (["eval", "--official-weights", str(smoke_ckpt)],
              "is a craft_dist.py checkpoint, not a torchvision/BasicSR weights file "
              "\\(pass it to eval as --ckpt\\)")]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=f"^error: .*{message}"):
            cd.main(argv + ["--device", "cpu"])
    with pytest.raises(common.UserError, match="other.pt is a other.py checkpoint, not a torchvision"):
        cd.build_phi("alexnet", tmp_path / "other.pt")                  # weights --phi-weights


def torchrun(argv) -> subprocess.CompletedProcess:
    """`craft_dist.py <argv>` under torchrun with two CPU ranks (tests/ddp_train_probe.py)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_train_probe.py"), "craft_dist", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_two_ranks_agree(tmp_path, tiny_hr_dir):
    out = tmp_path / "ddp"
    proc = torchrun(train_args(out, tiny_hr_dir, "--steps", "3"))
    ranks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["world"] == 2 and r["models"] >= 1 for r in ranks)
    assert all(r["ranks_agree"] for r in ranks) and ranks[0]["checksum"] == ranks[1]["checksum"]
    ckpt = common.load_checkpoint(out / "last.pt", "craft_dist", ("sr",))
    assert ckpt["step"] == 3 and sorted(p.name for p in out.iterdir()) == ["last.pt", "log.jsonl"]   # no stray temp
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]  # rank 0


def test_two_processes_compute_the_run_of_one(tmp_path, tiny_hr_dir):
    """Global batch 4: one process, or two taking 2 each, train the same network and EMA (L1 is a mean over equal
    shares, no batch statistic); a resume may change the number of processes."""
    def run(name, *extra):
        return train_args(tmp_path / name, tiny_hr_dir, "--batch-size", "4", *extra)
    cd.main(run("one", "--steps", "3"))
    torchrun(run("two", "--steps", "3"))
    cd.main(run("mixed", "--steps", "2"))                                           # 1 process ...
    torchrun(run("mixed", "--steps", "3", "--resume"))                             # ... then 2
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    for name in ("two", "mixed"):
        ckpt = torch.load(tmp_path / name / "last.pt", weights_only=True)
        for part in ("model", "ema"):
            for key, value in one[part].items():
                torch.testing.assert_close(ckpt[part][key], value, rtol=1e-5, atol=1e-7, msg=f"{name} {part} {key}")
    assert last_log(tmp_path / "two")["loss"] == pytest.approx(last_log(tmp_path / "one")["loss"], rel=1e-5)


def test_ema_formula_and_eval_uses_it(tmp_path, smoke_ckpt, tiny_hr_dir):
    """θ_ema ← d θ_ema + (1 − d) θ after every step (BasicSR); the checkpoint keeps it and eval loads it."""
    net, ema = cd.MSRResNet(8, 1), cd.MSRResNet(8, 1)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    common.ema_update(ema, net, 0.9)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(ema.state_dict()[key], 0.9 * before[key] + 0.1 * value, rtol=0, atol=1e-7)
    ckpt = torch.load(smoke_ckpt, weights_only=True)                # smoke preset: decay 0.9
    assert ckpt["config"]["ema_decay"] == 0.9
    assert any(not torch.equal(ckpt["ema"][k], v) for k, v in ckpt["model"].items())        # it lags the weights
    args = SimpleNamespace(ckpt=smoke_ckpt, official_weights=None, scale=4, channels_last=False)
    loaded, title = cd.load_sr_for_eval(args, "cpu")
    assert title.endswith("step 4 EMA") and all(torch.equal(v, ckpt["ema"][k]) for k, v in loaded.state_dict().items())
    cd.main(train_args(tmp_path / "plain", tiny_hr_dir, "--ema-decay", "0"))
    plain = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)
    args.ckpt = tmp_path / "plain" / "last.pt"
    loaded, title = cd.load_sr_for_eval(args, "cpu")
    assert "ema" not in plain and title.endswith("step 4")
    assert all(torch.equal(v, plain["model"][k]) for k, v in loaded.state_dict().items())
    with pytest.raises(SystemExit, match=r"^error: --ema-decay 1.0: expected 0 \(no EMA\) <= decay < 1$"):
        cd.main(train_args(tmp_path / "bad", tiny_hr_dir, "--ema-decay", "1"))


def test_refs_can_take_the_crops_weights_takes(tmp_path, clean_dir):
    """--same-crops: the references are Y_w's crops (same-content validation, spec §7.1) with fresh degradations;
    by default other positions. Bin (0, 0, 2) is mild, so a reference stays close to the bicubic LR of its crop."""
    y_w = common.quantize(common.imresize(cd.clean_crops(clean_dir, 4, 288, cd.Config.seed), 1 / 4))  # `weights`' Y_w
    errors = {}
    for flag in ("--same-crops", "--no-same-crops"):
        cd.main(["refs", "--clean-dir", str(clean_dir), "--bin", "0", "0", "2", "--n", "4", "--device", "cpu",
                 "--out-dir", str(tmp_path / flag), flag])
        refs = torch.stack([common.load_image(p) for p in sorted((tmp_path / flag).glob("ref*.png"))])
        errors[flag] = float((refs - y_w).abs().mean())
    assert errors["--same-crops"] < 0.5 * errors["--no-same-crops"]


# ---- fast paths: the same math -----------------------------------------------------------------------------
def logged_losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_compiled_training_and_eval_equal_eager(tmp_path, tiny_hr_dir, smoke_ckpt, tiny_bench_root):
    for name, flag in (("eager", []), ("compiled", ["--compile"])):
        cd.main(train_args(tmp_path / name, tiny_hr_dir, "--steps", "2", *flag))
    assert logged_losses(tmp_path / "compiled") == pytest.approx(logged_losses(tmp_path / "eager"), rel=1e-5)
    states = [torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("eager", "compiled")]
    for part in ("model", "ema"):
        for key in states[0][part]:
            torch.testing.assert_close(states[1][part][key], states[0][part][key], rtol=1e-4, atol=1e-6)
    eager, compiled = (model_psnrs(smoke_ckpt, tiny_bench_root, tmp_path / name, *flags)
                       for name, flags in (("ev_eager", []), ("ev_compiled", ["--compile"])))
    assert len(eager) == 3 and compiled == pytest.approx(eager, abs=1e-3)

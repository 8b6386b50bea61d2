"""--channels-last (NHWC) runs every network in that layout end to end, with the output of the default layout: no
convolution falls back to NCHW (each fallback costs two layout copies), the per-sample dynamic convolution included."""
import pytest
import torch

import craft_dist
import kdsr
import mrda
import pdm_sr
import redsr
from conftest import ConvLayouts

IMG = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(0))
NETWORKS = {   # name: (smoke-size network, its eval forward on an LR image)
    "KDSR_S": (lambda: kdsr.build_model(kdsr.Config(**kdsr.PRESETS["smoke"]), teacher=False),
               lambda net, img: net.G(img, net.estimate(img)[0])),
    "MRDA_S": (lambda: mrda.build_model(mrda.Config(**mrda.PRESETS["smoke"]), teacher=False),
               lambda net, img: net(img)[0]),
    "ReDSR": (lambda: redsr.build_model(redsr.Config(**redsr.PRESETS["smoke"])),
              lambda net, img: net.super_resolve(img)),
    "PDM-SR EDSR": (lambda: pdm_sr.build_sr(pdm_sr.Config(**pdm_sr.PRESETS["smoke"])), lambda net, img: net(img)),
    "craft_dist MSRResNet": (lambda: craft_dist.build_sr(craft_dist.Config(**craft_dist.PRESETS["smoke"])),
                             lambda net, img: net(img)),
}


@pytest.mark.parametrize("name", NETWORKS)
def test_eval_forward_stays_channels_last_with_the_same_output(name):
    build, forward = NETWORKS[name]
    torch.manual_seed(0)
    net = build().eval()
    with torch.no_grad():
        reference = forward(net, IMG)
        net.to(memory_format=torch.channels_last)
        with ConvLayouts() as convs:
            out = forward(net, IMG)                   # an NCHW input: the channels_last weights decide the layout
    assert convs.total > 5 and convs.off == 0, f"{convs.off} of {convs.total} convolutions gave NCHW outputs"
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference)


@pytest.mark.parametrize("batch, reflect", [(1, False), (3, False), (1, True), (2, True)])
def test_dynamic_depthwise_keeps_the_layout_with_the_same_values_and_gradients(batch, reflect):
    torch.manual_seed(0)
    x, weight = torch.randn(batch, 4, 7, 9), torch.randn(batch, 4, 3, 3)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        xi, wi = x.contiguous(memory_format=layout).requires_grad_(), weight.clone().requires_grad_()
        out = kdsr.dynamic_depthwise(xi, wi, reflect)
        assert out.is_contiguous(memory_format=layout)
        results.append((out, *torch.autograd.grad(out, (xi, wi), torch.arange(out.numel()).view_as(out) / 100.0)))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected)

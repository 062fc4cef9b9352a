"""Coverage: which timm and torchvision architectures convert, what becomes elastic, and whether
the analytic MACs are right.

For each model (random weights, batch 2 at its default input size): the number of width groups
(heads count as groups too) and depth stages, the number of presets, the full and smallest
presets' MACs from the plan against ``FlopCounterMode`` on the extracted sub-network (FLOPs / 2;
fused attention off so the counter sees its matmuls), and the largest difference between the
extracted sub-network and the elastic model at that preset. One markdown row per model; a model
that fails prints its error in the row and the run goes on.

    python benchmarks/bench_coverage.py [--threads 2] [MODEL ...]   # e.g. timm:resnet18 torchvision:swin_t
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import _results
import elasticize
from elasticize.testing import output_tensor

MODELS = [
    "torchvision:resnext50_32x4d", "torchvision:wide_resnet50_2", "torchvision:convnext_tiny",
    "torchvision:efficientnet_b0", "torchvision:regnet_y_400mf", "torchvision:densenet121", "torchvision:vgg11",
    "torchvision:squeezenet1_0", "torchvision:shufflenet_v2_x1_0", "torchvision:mnasnet1_0",
    "torchvision:mobilenet_v3_small", "torchvision:googlenet", "torchvision:inception_v3", "torchvision:swin_t",
    "torchvision:swin_v2_t", "torchvision:maxvit_t", "torchvision:vit_b_16",
    "timm:deit_tiny_patch16_224", "timm:beit_base_patch16_224", "timm:eva02_tiny_patch14_336",
    "timm:swin_tiny_patch4_window7_224", "timm:convnextv2_atto", "timm:efficientvit_b0", "timm:levit_128",
    "timm:regnetx_002", "timm:rexnet_100", "timm:mobilevit_xs", "timm:poolformer_s12", "timm:coat_lite_tiny",
    "timm:fastvit_t8", "timm:ghostnet_100", "timm:edgenext_xx_small",
    # a wider sweep: hierarchical, windowed, conv-attention hybrids, MLP mixers, LSTM mixers
    "timm:cait_xxs24_224", "timm:xcit_nano_12_p16_224", "timm:pvt_v2_b0", "timm:twins_svt_small",
    "timm:crossvit_tiny_240", "timm:mvitv2_tiny", "timm:hiera_tiny_224", "timm:focalnet_tiny_srf",
    "timm:davit_tiny", "timm:efficientformer_l1", "timm:efficientformerv2_s0", "timm:repvit_m1",
    "timm:tiny_vit_5m_224", "timm:gcvit_xxtiny", "timm:maxvit_tiny_rw_224", "timm:volo_d1_224",
    "timm:deit3_small_patch16_224", "timm:resmlp_12_224", "timm:gmlp_s16_224", "timm:sequencer2d_s",
    "timm:inception_next_tiny", "timm:hgnetv2_b0", "timm:mobilenetv4_conv_small", "timm:efficientnetv2_rw_t",
    "timm:nfnet_l0", "timm:dla34", "timm:dpn68", "timm:res2net50_14w_8s", "timm:resnest14d", "timm:cspresnet50",
    "timm:hrnet_w18_small", "timm:mobileone_s0", "timm:fbnetv3_b", "timm:lcnet_050", "timm:skresnet18",
    "timm:visformer_tiny", "timm:pit_ti_224", "timm:convit_tiny", "timm:swinv2_tiny_window8_256",
    "timm:vit_relpos_small_patch16_224", "timm:coatnet_nano_rw_224", "timm:nextvit_small", "timm:starnet_s1",
    "timm:mambaout_femto", "timm:rdnet_tiny", "timm:vit_small_patch16_rope_224", "timm:fastvit_sa12",
    # issue 19's wider sweep: segmentation (ASPP concatenation), quantizable (quantize=False), video
    "torchvision:fcn_resnet50", "torchvision:deeplabv3_resnet50", "torchvision:lraspp_mobilenet_v3_large",
    "torchvision:quantized_resnet18", "torchvision:quantized_mobilenet_v2", "torchvision:quantized_mobilenet_v3_large",
    "torchvision:quantized_shufflenet_v2_x0_5", "torchvision:quantized_googlenet", "torchvision:quantized_inception_v3",
    "torchvision:r3d_18", "torchvision:mc3_18", "torchvision:r2plus1d_18", "torchvision:s3d",
]
#: input shape (without the batch) of the models that do not take the adapter's default (small, to keep the run short)
INPUTS = {
    **dict.fromkeys(["torchvision:fcn_resnet50", "torchvision:deeplabv3_resnet50",
                     "torchvision:lraspp_mobilenet_v3_large"], (3, 128, 128)),
    **dict.fromkeys(["torchvision:r3d_18", "torchvision:mc3_18", "torchvision:r2plus1d_18"], (3, 4, 64, 64)),
    "torchvision:s3d": (3, 16, 112, 112),
}


def measured_macs(module: torch.nn.Module, x: torch.Tensor) -> float:
    """MACs of one forward of ``module`` on ``x`` by ``FlopCounterMode`` (FLOPs / 2), math attention.

    ``module`` (an extracted copy) stops requiring gradients: the counter's module tracker hooks
    every tensor that does, and fails on a parameter expanded under ``no_grad`` (timm CaiT, PiT).
    """
    module.requires_grad_(False)
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            module(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return fc.get_total_flops() / 2


def row(spec: str) -> list[str]:
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        shape = INPUTS.get(spec)
        em = elasticize.convert(spec, pretrained=False,
                                example_inputs=None if shape is None else (torch.randn(1, *shape),)).eval()
        x = torch.randn(2, *em.input_shapes[0][1:])
        cells = []
        for p in (next(iter(em.presets)), list(em.presets)[-1]):
            sub = em.extract(p).eval()
            with torch.no_grad(), em.subnet(p):  # a segmentation model's output is a dict: its "out" tensor
                diff = (output_tensor(sub(x)) - output_tensor(em(x))).abs().max().item()
            cells += [f"{em.macs(p) / 1e9:.3f} / {measured_macs(sub, x[:1]) / 1e9:.3f}", f"{diff:.0e}"]
        kinds = [g.kind for g in em.plan.groups]
        return [spec, str(kinds.count("width")), str(kinds.count("heads")), str(len(em.plan.stages)),
                str(len(em.presets)), *cells, f"{time.perf_counter() - t0:.1f}"]
    except Exception as e:  # noqa: BLE001 - report the failure and go on
        return failed(spec, e)


def failed(name: str, e: Exception) -> list[str]:
    """The row of a model that failed: its name and its error's first line."""
    return [name, f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"]


def print_table(doc: str, default: list[str], row: Callable[[str], list[str]], header: list[str], versions: str = "",
                script: str = __file__) -> None:
    """The command line shared by the coverage benchmarks: ``[--threads N] [--results FILE] [NAME ...]``, the
    machine, then one markdown row per name; the rows also go to ``script``'s results file."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("names", nargs="*", default=default)
    ap.add_argument("--threads", type=int, default=2)
    _results.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"torch {torch.__version__}{versions}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    for name in args.names:
        cells = row(name)
        print("| " + " | ".join(cells) + " |", flush=True)
        rows.append(cells + [""] * (len(header) - len(cells)))  # a failed model's row: its name and its error
    _results.write(script, [_results.table(header, rows)], dest=args.results,
                   machine_text=_results.machine(args.threads) + versions)


def main() -> None:
    print_table(__doc__, MODELS, row, ["model", "width groups", "heads groups", "depth stages", "presets",
                                       "full GMACs plan / counted", "full max diff", "smallest GMACs plan / counted",
                                       "smallest max diff", "s"])


if __name__ == "__main__":
    main()

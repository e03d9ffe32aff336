"""The runtimes an exported model runs under: TorchScript (model.pt), or its ONNX programs
(onnx/<method>.onnx) under ONNX Runtime or OpenVINO. Export measures them and names the fastest in
preprocessing.json; the serving core runs whichever the folder names, on every engine."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from marketplace_classifier.serving.layout import ONNX_FOLDER
from marketplace_classifier.serving.model_kinds import ModelKind
from marketplace_classifier.serving.settings import ONNXRUNTIME, OPENVINO


def onnx_methods(kind: ModelKind) -> tuple[str, ...]:
    """The methods an ONNX export holds, one program each. A fused model's forward is its listings
    with one photo per listing (export checks that they agree), so it is not stored twice."""
    if kind.text_once_per_listing:
        return tuple(kind.extra_methods)
    return ("forward", *kind.extra_methods)


def onnx_path(folder: Path, method: str, int8: bool = False, runtime: str = ONNXRUNTIME) -> Path:
    """A method's program: <method>.onnx; its int8 variant <method>.int8.onnx for ONNX Runtime
    (dynamic quantisation) or <method>.int8.xml (+ .bin) for OpenVINO (NNCF static quantisation)."""
    suffix = ".int8.xml" if int8 and runtime == OPENVINO else ".int8.onnx" if int8 else ".onnx"
    return Path(folder) / ONNX_FOLDER / f"{method}{suffix}"


def onnx_files(folder: Path, kind: ModelKind, int8: bool = False, runtime: str = ONNXRUNTIME) -> list[Path]:
    """The files of a kind's programs under `runtime` (an OpenVINO IR is its .xml and .bin)."""
    paths = [onnx_path(folder, method, int8, runtime) for method in onnx_methods(kind)]
    return paths + [path.with_suffix(".bin") for path in paths if path.suffix == ".xml"]


@functools.cache
def bf16_supported() -> bool:
    """Whether this CPU has bfloat16 units OpenVINO computes with (AVX512-BF16, AMX); elsewhere a
    folder that chose bf16 is served in float32."""
    return "BF16" in _imported("openvino").Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OnnxMethod:
    """One ONNX program under ONNX Runtime or OpenVINO (CPU, float32, or bfloat16 under OpenVINO when
    `bf16` and the CPU has it): called like the TorchScript method it was exported from, with
    tensors in the same order, and answering a float tensor."""

    def __init__(self, path: Path, runtime: str, threads: int = 1, bf16: bool = False):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} is missing: export the model with its ONNX programs")
        if bf16 and runtime != OPENVINO:
            raise ValueError(f"bfloat16 is OpenVINO's precision hint; {runtime} runs these in float32")
        self.path, self.runtime = Path(path), runtime
        self.precision = "bf16" if bf16 and bf16_supported() else "f32"
        if runtime == ONNXRUNTIME:
            self.names, self._run = self._onnxruntime(threads)
        elif runtime == OPENVINO:
            self.names, self._run = self._openvino(threads)
        else:
            raise ValueError(f"unknown ONNX runtime {runtime!r}; choose {ONNXRUNTIME} or {OPENVINO}")

    def _onnxruntime(self, threads: int):
        onnxruntime = _imported("onnxruntime")

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3  # its buffer-reuse warnings at every new text length are noise
        session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        return [node.name for node in session.get_inputs()], lambda feed: session.run(None, feed)[0]

    def _openvino(self, threads: int):
        openvino = _imported("openvino")

        # f32 unless asked: on CPUs with bf16 units OpenVINO would otherwise compute in bf16 (1e-2
        # off, not 1e-5), which export adopts only behind the accuracy gate. No pinning: each
        # worker process would pin its thread to the same core (two workers measured 21 photos/s
        # each pinned, 54 unpinned).
        compiled = openvino.Core().compile_model(str(self.path), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": self.precision,
            "ENABLE_CPU_PINNING": False})
        output = compiled.output(0)
        # an infer request per call: the compiled model's own one is not safe across threads
        return ([port.any_name for port in compiled.inputs],
                lambda feed: compiled.create_infer_request().infer(feed)[output])

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.names):
            raise ValueError(f"{self.path.name} takes {len(self.names)} inputs ({', '.join(self.names)}), "
                             f"not {len(inputs)}")
        feed = {name: tensor.detach().cpu().contiguous().numpy()
                for name, tensor in zip(self.names, inputs, strict=True)}
        return torch.from_numpy(np.array(self._run(feed), dtype=np.float32, copy=True))


def _imported(package: str):
    """The runtime's package, or an error that says how to install it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise RuntimeError(f"this export runs under {package}, which is not installed here: "
                           "pip install -r marketplace_classifier/serving/requirements.txt") from error


class OnnxModel:
    """A kind's ONNX programs standing in for its TorchScript: callable as forward, with text_only
    and listings attributes where the kind has them."""

    def __init__(self, methods: dict[str, OnnxMethod]):
        self.methods = methods
        for name, method in methods.items():
            if name != "forward":
                setattr(self, name, method)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if "forward" in self.methods:
            return self.methods["forward"](*inputs)
        images, *text = inputs  # a fused model: each photo a listing of its own
        return self.methods["listings"](images, torch.arange(len(images)), *text)

    def eval(self) -> OnnxModel:
        return self


def load_onnx_model(folder: Path, kind: ModelKind, runtime: str, threads: int = 1,
                    int8: bool = False, bf16: bool = False) -> OnnxModel:
    """The ONNX programs of an exported folder under `runtime`, each on `threads` threads (in
    bfloat16 when `bf16`: OpenVINO only)."""
    return OnnxModel({method: OnnxMethod(onnx_path(folder, method, int8, runtime), runtime, threads, bf16)
                      for method in onnx_methods(kind)})

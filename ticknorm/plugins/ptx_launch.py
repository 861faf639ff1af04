"""The plugin kernel's PTX loaded by the CUDA driver and launched the way TensorRT launches it:
input pointers, the int32 extra arguments, the output pointer, then null for every parameter Triton
added. This is the one proof, short of TensorRT itself, that the engine's kernel computes what the
JIT kernel computes.

It talks to libcuda through ctypes: every CUDA host has the driver, while cupy and cuda-python
are optional, so the check runs on a bare machine with torch and triton. The launch goes on the
caller's stream in the caller's current context (the one PyTorch made when it allocated the
tensors)."""

import ctypes

from ticknorm.base.errors import RuntimeFailure, RuntimeUnavailable
from ticknorm.plugins.aot import PLUGIN_PARAMS, AotKernel, driver_version, ptx_isa

# PTX parameter types -> the C type whose bytes cuLaunchKernel reads for them (the types
# `compile_layer_norm` admits: pointers and Triton's i32 as u64 and u32).
PARAM_CTYPES = {"u64": ctypes.c_uint64, "u32": ctypes.c_uint32}
# The driver's answers that mean "this driver cannot take this PTX", not "the PTX is wrong".
DRIVER_TOO_OLD = {209: "no binary for this GPU", 221: "no PTX JIT compiler", 222: "unsupported PTX version"}
MAX_DYNAMIC_SHARED_SIZE = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES

_SIGNATURES = {
    "cuInit": (ctypes.c_uint,),
    "cuCtxGetCurrent": (ctypes.POINTER(ctypes.c_void_p),),
    "cuModuleLoadData": (ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p),
    "cuModuleGetFunction": (ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p),
    "cuFuncSetAttribute": (ctypes.c_void_p, ctypes.c_int, ctypes.c_int),
    "cuLaunchKernel": (ctypes.c_void_p, *(ctypes.c_uint,) * 7, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                       ctypes.POINTER(ctypes.c_void_p)),
    "cuModuleUnload": (ctypes.c_void_p,),
    "cuGetErrorName": (ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)),
}


def cuda_driver() -> ctypes.CDLL:
    """libcuda with the argument types declared: ctypes would otherwise pass a 64-bit handle as a
    C int."""
    try:
        library = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise RuntimeUnavailable(f"no CUDA driver library (libcuda.so.1) to load the PTX with: {exc}") from exc
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return library


def kernel_arguments(kernel: AotKernel, pointers: tuple, n_rows: int) -> list:
    """TensorRT's arguments as C values in the PTX's parameter types: `pointers` are (X, W, B, Y)
    device addresses; Triton's hidden parameters get null."""
    x, weight, bias, out = pointers
    values = (x, weight, bias, n_rows, kernel.hidden, out) + (0,) * kernel.hidden_params
    if len(values) != len(kernel.param_types):
        raise RuntimeFailure(f"{kernel.entry} takes {len(kernel.param_types)} parameters; TensorRT passes "
                             f"{', '.join(PLUGIN_PARAMS)} and {kernel.hidden_params} null")
    return [PARAM_CTYPES[ptx_type](value) for ptx_type, value in zip(kernel.param_types, values)]


class LoadedPtx:
    """One kernel's PTX as a driver module, held for as many launches as the caller makes:
    `with LoadedPtx(kernel) as loaded: loaded.launch(pointers, n_rows, stream)`."""

    _driver: ctypes.CDLL  # libcuda, from __enter__ on

    def __init__(self, kernel: AotKernel):
        self.kernel = kernel
        self._module = ctypes.c_void_p()
        self._function = ctypes.c_void_p()

    def __enter__(self) -> "LoadedPtx":
        self._driver = cuda_driver()
        self._call("cuInit", 0)
        context = ctypes.c_void_p()
        self._call("cuCtxGetCurrent", ctypes.byref(context))
        if not context.value:
            raise RuntimeFailure("no CUDA context is current in this thread: allocate the tensors on the device first")
        self._load()
        try:
            self._call("cuModuleGetFunction", ctypes.byref(self._function), self._module, self.kernel.entry.encode())
            self._call("cuFuncSetAttribute", self._function, MAX_DYNAMIC_SHARED_SIZE, self.kernel.shared_bytes)
        except RuntimeFailure:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        if self._module.value:
            self._driver.cuModuleUnload(self._module)
            self._module = ctypes.c_void_p()

    def launch(self, pointers: tuple, n_rows: int, stream: int = 0) -> None:
        """Asynchronous on `stream` (a CUstream handle; 0 is the legacy default stream)."""
        arguments = kernel_arguments(self.kernel, pointers, n_rows)
        addresses = (ctypes.c_void_p * len(arguments))(*[ctypes.addressof(a) for a in arguments])
        self._call("cuLaunchKernel", self._function, self.kernel.grid(n_rows), 1, 1, self.kernel.threads, 1, 1,
                   self.kernel.shared_bytes, stream, addresses, None)

    def _load(self) -> None:
        result = self._driver.cuModuleLoadData(ctypes.byref(self._module), self.kernel.ptx.encode())
        if result in DRIVER_TOO_OLD:
            isa = ptx_isa(self.kernel.ptx)
            raise RuntimeUnavailable(f"the CUDA driver {driver_version() or '?'} cannot load "
                                     f"PTX ISA {isa // 10}.{isa % 10} "
                                     f"for sm_{self.kernel.arch} ({self._name(result)}: {DRIVER_TOO_OLD[result]}); "
                                     "a newer driver is missing")
        self._raise_on(result, "cuModuleLoadData")

    def _call(self, name: str, *arguments) -> None:
        self._raise_on(getattr(self._driver, name)(*arguments), name)

    def _raise_on(self, result: int, name: str) -> None:
        if result != 0:
            raise RuntimeFailure(f"{name} failed for {self.kernel.entry} ({self.kernel.dtype}, hidden "
                                 f"{self.kernel.hidden}): {self._name(result)}")

    def _name(self, result: int) -> str:
        text = ctypes.c_char_p()
        if self._driver.cuGetErrorName(result, ctypes.byref(text)) != 0 or not text.value:
            return f"CUDA error {result}"
        return text.value.decode()

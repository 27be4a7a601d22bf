"""Print what CMakeLists.txt needs to know about the installed torch, one KEY=value a line."""
import os

import torch

torch_dir = os.path.dirname(torch.__file__)
inc = os.path.join(torch_dir, "include")
includes = [inc, os.path.join(inc, "torch", "csrc", "api", "include")]
cuda_includes = []
if torch.version.cuda:
    # CUDA wheels ship the CUDA headers as nvidia-* packages (nvidia/cu13/include on CUDA 13).
    try:
        import nvidia

        for root in nvidia.__path__:
            for sub in sorted(os.listdir(root)):
                cand = os.path.join(root, sub, "include")
                if os.path.isdir(cand):
                    cuda_includes.append(cand)
    except ImportError:
        pass
print(f"TORCH_VERSION={torch.__version__}")
print(f"TORCH_DIR={torch_dir}")
print(f"TORCH_LIBDIR={os.path.join(torch_dir, 'lib')}")
print("TORCH_INCLUDES=" + ";".join(includes))
print("TORCH_CUDA_INCLUDES=" + ";".join(cuda_includes))
print(f"TORCH_CUDA={'ON' if torch.version.cuda else 'OFF'}")
print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
# The libstdc++ this process (python + torch) loaded: _C links it explicitly (CMakeLists.txt), so
# the extension never carries a private static copy of the C++ runtime.
try:
    with open("/proc/self/maps") as maps:
        stdcxx = sorted({line.split()[-1] for line in maps if "/libstdc++.so" in line})
except OSError:  # not Linux
    stdcxx = []
print("TORCH_LIBSTDCXX=" + (stdcxx[0] if stdcxx else ""))

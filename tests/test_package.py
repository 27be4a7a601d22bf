"""Packaging: build info, the pure-PyTorch fallback without the extension, README <-> CI."""
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import pyfastbayes

from _helpers import in_ci, native_problem, needs_native, require

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_build_info_fields():
    info = pyfastbayes.build_info()
    assert {"version", "torch", "cuda", "cuda_archs", "openmp", "native", "cpu_philox"} <= set(info)
    assert info["version"] == pyfastbayes.__version__
    if info["native"]:
        assert info["torch"] == torch.__version__
        assert info["cpu_philox"] in ("avx512", "avx2", "scalar")
        if info["cuda"]:
            assert "90" in info["cuda_archs"].split(",")


@needs_native
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared objects: Linux")
def test_extension_uses_the_shared_cxx_runtime():
    """_C names libstdc++.so as a dependency: a private static copy of the C++ runtime makes every
    C++ exception crossing _C (each refused argument) kill the process (CMakeLists.txt)."""
    import shutil

    import pyfastbayes._C as native

    readelf = shutil.which("readelf")
    if readelf is None:
        (pytest.fail if in_ci() else pytest.skip)("readelf (binutils) is not installed")
    out = subprocess.run([readelf, "-dW", native.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    assert any(n.startswith("libstdc++.so") for n in needed), needed
    # and a refusal from C++ reaches Python in a fresh process (the crash killed the interpreter)
    code = ("import torch, pyfastbayes.ops as ops\n"
            "try:\n    ops.calibration_bins(torch.rand(3, 4), torch.zeros(3, dtype=torch.long), 0, backend='native')\n"
            "except (RuntimeError, ValueError) as e:\n    print('refused', type(e).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "refused" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


@needs_native
def test_fallback_without_extension_gives_the_same_chain():
    """With _C blocked, import warns once, and SGLD runs the reference: the same numbers."""
    code = textwrap.dedent("""
        import sys, warnings
        if sys.argv[1] == "blocked":
            sys.modules["pyfastbayes._C"] = None   # makes `from . import _C` raise ImportError
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import torch, pyfastbayes
            from pyfastbayes.optim import SGLD
        msgs = [str(x.message) for x in w if "compiled extension" in str(x.message)]
        assert len(msgs) == (1 if sys.argv[1] == "blocked" else 0), msgs
        assert pyfastbayes.build_info()["native"] == (sys.argv[1] != "blocked")
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(1001))
        opt = SGLD([p], lr=1e-3, num_data=10)
        for _ in range(3):
            p.grad = torch.sin(p.detach())
            opt.step()
        torch.save(p.detach(), sys.argv[2])
    """)
    outs = []
    for mode in ("blocked", "native"):
        path = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"pfb-{mode}-{os.getpid()}.pt"
        subprocess.run([sys.executable, "-c", code, mode, str(path)], check=True, cwd="/")
        outs.append(torch.load(path))
        path.unlink()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = [b.split("```")[0].strip() for b in readme.split("```bash")[1:]]
    commands = [b for b in blocks if "pytest" in b and "setup.sh" in b]
    assert len(commands) == 1, "README must give exactly one setup-and-test command"
    assert commands[0] in ci, ".ci/run must run the README's test command"
    assert any("pyfastbayes demo" in b and "setup.sh" in b for b in blocks), "README must give the demo command"


def test_ci_fails_without_the_native_extension():
    """Under CI=true a build whose extension does not load fails the run, with the load error,
    instead of skipping every native test (without CI it runs on the references:
    test_fallback_without_extension_gives_the_same_chain)."""
    code = textwrap.dedent("""
        import sys
        sys.modules["pyfastbayes._C"] = None   # the extension does not load
        import pytest
        sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_ops_layouts.py"]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    ci = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, CI="true"),
                        capture_output=True, text=True, timeout=300)
    out = ci.stdout + ci.stderr
    assert ci.returncode != 0, out
    assert "CI=true but the pyfastbayes native extension did not load" in out, out
    assert "import of pyfastbayes._C halted" in out, out  # the reason it did not load


def test_native_problem_only_under_ci(monkeypatch):
    blocked = {"native": False, "error": "ImportError: no _C"}
    monkeypatch.delenv("CI", raising=False)
    assert not in_ci() and native_problem(blocked) is None
    monkeypatch.setenv("CI", "true")
    assert in_ci() and "ImportError: no _C" in native_problem(blocked)
    assert native_problem({"native": True}) is None
    monkeypatch.setenv("CI", "false")
    assert native_problem(blocked) is None


def test_require_skips_locally_and_fails_under_ci(monkeypatch):
    assert require("math").sqrt(4.0) == 2.0
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="pfb_no_such_module"):
        require("pfb_no_such_module")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: pfb_no_such_module is not installed"):
        require("pfb_no_such_module")


@needs_native
def test_backend_choice_follows_its_inputs_despite_the_cache(monkeypatch):
    """ops select() remembers its choice per (op, device, backend, default, extension): a different
    backend, a default_backend block, a bad backend name and a swapped-out extension are each
    answered afresh."""
    from pyfastbayes import _native, _reference, ops
    from pyfastbayes.ops._dispatch import select

    cpu = torch.device("cpu")
    native = torch.ops.pyfastbayes.vi_sample.default
    assert select("vi_sample", cpu) is native and select("vi_sample", cpu) is native
    assert select("vi_sample", cpu, "reference") is _reference.vi_sample
    with ops.default_backend("reference"):
        assert select("vi_sample", cpu) is _reference.vi_sample
    assert select("vi_sample", cpu) is native
    for _ in range(2):  # a wrong name is refused every time, never remembered
        with pytest.raises(ValueError, match="backend must be None"):
            select("vi_sample", cpu, "fast")
    monkeypatch.setattr(_native, "has_kernel", lambda device: False)
    assert select("vi_sample", cpu) is _reference.vi_sample
    with pytest.raises(RuntimeError, match="no native kernel for cpu"):
        select("vi_sample", cpu, "native")
    monkeypatch.undo()
    assert select("vi_sample", cpu) is native


@needs_native
def test_compiled_op_calls_do_not_recompile_as_the_choice_cache_grows():
    """select() skips its cache under torch.compile: a traced dict lookup would guard on the dict,
    and every new (op, device, backend) choice made anywhere would recompile the frame (and past the
    recompile limit run it eagerly)."""
    from torch._dynamo.testing import CompileCounter

    from pyfastbayes import ops

    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def sample(mu, rho, rng):
        return ops.vi_sample(mu, rho, rng, 3)

    mu, rho, rng = torch.zeros(8), torch.zeros(8), torch.tensor([1, 2])
    first = sample(mu, rho, rng)
    for name in ("vi_sample_backward", "vi_local_noise", "philox_normal_", "sgld_step_", "swag_sample"):
        for backend in (None, "native", "reference"):  # new choices made in eager code
            ops.select(name, torch.device("cpu"), backend)
        assert torch.equal(sample(mu, rho, rng), first)
    assert counter.frame_count == 1


def test_warn_user_skips_library_and_torch_frames():
    """A warning raised inside the package through torch's @no_grad wrapper names the caller's line
    (a first frame outside pyfastbayes alone was torch/utils/_contextlib.py)."""
    import os
    import warnings

    import pyfastbayes

    fake = os.path.join(os.path.dirname(pyfastbayes.__file__), "_fake_caller.py")  # never written: a code name only
    ns: dict = {}
    exec(compile("import torch\nfrom pyfastbayes._warnings import warn_user\n@torch.no_grad()\n"
                 "def lib():\n    warn_user('w')\n", fake, "exec"), ns)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ns["lib"]()
    assert [w.filename for w in seen] == [__file__]


# twelfth-session review: a bad --device ran the whole regression part before failing with a
# traceback; pyfastbayes.vi / .data were not reachable as attributes like .laplace
@pytest.mark.parametrize("argv, message", [
    (["demo", "--device", "tpu"], "--device tpu: not a torch device"),
    (["demo", "--device", "cuda:0"], "--device cuda:0: torch.cuda.is_available() is False"),
])
def test_cli_refuses_a_device_before_any_work(argv, message, capsys, tmp_path):
    import torch
    from pyfastbayes.__main__ import main
    if "cuda" in argv[-1] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as e:
        main(argv + ["--out", str(tmp_path / "report")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_cli_refuses_a_file_as_the_report_folder(capsys, tmp_path):
    from pyfastbayes.__main__ import main
    f = tmp_path / "taken"
    f.write_text("")
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(f)])
    assert "a file of that name exists" in capsys.readouterr().err


def test_subpackages_are_attributes():
    import pyfastbayes
    for name in ("curvature", "landscape", "laplace", "diagnostics", "vi", "data"):
        assert getattr(pyfastbayes, name).__name__ == f"pyfastbayes.{name}" and name in pyfastbayes.__all__

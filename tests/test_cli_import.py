"""``jaxcam explain --import MODULE``: a method registered in a module outside the
package runs from the command line, alone and beside a built-in method, and gives the
map ``jaxcam.explain`` gives in-process.

The model is the 3-conv CNN of ``tests/test_compilation.py`` (a jaxcam checkpoint
built by ``--model``), explained at 32 px, so the subprocess compiles little.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jaxcam
from jaxcam import checkpoint, cli, methods
from jaxcam.io import load_images
from jaxcam.preprocessing import Preprocessing
from tests.test_compilation import tiny_model, tiny_variables

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "tests.test_compilation:tiny_model"
PREP = Preprocessing(image_size=32, resize_size=None)
USER_MODULE = '''
import jax.numpy as jnp
import jaxcam


@jaxcam.methods.register("absgrad", default_target="logit", label="AbsGrad")
def absgrad(q):  # channel weights (B, K): mean |dS/dA| over the grid
    return jnp.mean(jnp.abs(q.D1), axis=(1, 2))
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folder holding the user's module and an image, checkpoint, model, variables)."""
    d = tmp_path_factory.mktemp("user")
    (d / "mymethods.py").write_text(USER_MODULE)
    (d / "broken.py").write_text("import jaxcam\nraise RuntimeError('half written')\n")
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize((32, 32), Image.BILINEAR).save(d / "img.png")
    model = tiny_model(num_classes=4)
    variables = tiny_variables(model)
    ckpt = checkpoint.save(d / "ckpt", model, variables, preprocessing=PREP,
                           factory=FACTORY, factory_kwargs={"num_classes": 4})
    return d, ckpt, model, variables


def run_cli(folder, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), str(ROOT)]))
    return subprocess.run([sys.executable, "-m", "jaxcam.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def absgrad():
    """The same registration, in this process (for the reference maps)."""
    methods.register("absgrad", default_target="logit")(
        lambda q: jnp.mean(jnp.abs(q.D1), axis=(1, 2)))
    yield
    methods.unregister("absgrad")


def test_imported_method_runs_alone_and_with_gradcam(setup, absgrad, tmp_path):
    d, ckpt, model, variables = setup
    x, _ = load_images([d / "img.png"], PREP)
    ref = jaxcam.explain(model, variables, x, method=["absgrad", "gradcam"])
    alone = jaxcam.explain(model, variables, x, method="absgrad")
    np.testing.assert_allclose(alone.maps, ref["absgrad"].maps, atol=1e-6)
    assert float(np.std(np.asarray(alone.maps))) > 0.05  # a real map, not a flat one
    common = ["--weights", ckpt, "--model", FACTORY]
    # --import after --method: read before parsing, so the choice is known
    for requested, out in ((["absgrad"], tmp_path / "alone"),
                           (["absgrad", "gradcam"], tmp_path / "both")):
        argv = ["explain", d / "img.png", *common]
        for m in requested:
            argv += ["--method", m]
        proc = run_cli(d, *argv, "--import", "mymethods", "--out", out)
        assert proc.returncode == 0, proc.stderr
        settings = json.loads((out / "predictions.json").read_text())["settings"]
        assert settings["methods"] == requested
        for m in requested:
            np.testing.assert_allclose(np.load(out / f"img_{m}.npy"),
                                       np.asarray(ref[m].maps)[0], atol=1e-5)
            np.testing.assert_allclose(np.load(out / f"img_{m}_raw.npy"),
                                       np.asarray(ref[m].raw)[0], rtol=1e-5, atol=1e-5)


def test_without_import_the_method_is_unknown_and_bad_modules_are_named(setup, capsys):
    d, ckpt, _, _ = setup
    base = ["explain", str(d / "img.png"), "--weights", str(ckpt), "--model", FACTORY,
            "--out", str(d / "never")]
    cases = [
        ([*base, "--method", "absgrad"], "argument --method: invalid choice: 'absgrad'"),
        ([*base, "--import", "no_such_module_xyz"],
         "--import no_such_module_xyz: cannot import module 'no_such_module_xyz' "
         "(No module named 'no_such_module_xyz'); check the name and put its folder on "
         "PYTHONPATH"),
        ([*base, "--import=tests.no_such_module"],
         "cannot import module 'tests.no_such_module'"),
        ([*base, "--import", "mymethods.py"], "'mymethods.py' is not a module name"),
        ([*base, "--import", "broken"],
         "--import broken: importing module 'broken' failed: RuntimeError: half written"),
    ]
    sys.path.insert(0, str(d))
    try:
        for argv, message in cases:
            with pytest.raises(SystemExit) as exit_info:
                cli.main(argv)
            err = capsys.readouterr().err
            assert exit_info.value.code == 2, err
            assert err.startswith("jaxcam explain: error: ") and err.count("\n") == 1, err
            assert message in err, (message, err)
    finally:
        sys.path.remove(str(d))
    assert "absgrad" not in jaxcam.METHODS
    assert not (d / "never").exists()


def test_requested_imports_are_read_from_the_explain_line_only():
    assert cli.requested_imports(["explain", "a.png", "--import", "m1", "--method", "x",
                                  "--import=pkg.m2"]) == ["m1", "pkg.m2"]
    assert cli.requested_imports(["--compilation-cache", "off", "explain", "a.png",
                                  "--import", "m"]) == ["m"]
    assert cli.requested_imports(["convert", "explain", "out", "--import", "m"]) == []
    assert cli.requested_imports(["explain", "--", "--import", "m"]) == []

"""The examples in python/examples and the README's Python block run and say what they claim."""

import pathlib
import re
import subprocess
import sys

from conftest import ROOT

EXAMPLES = ROOT / "python" / "examples"


def run(args, cwd):
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_digits_example(tmp_path):
    out = run([str(EXAMPLES / "digits.py")], tmp_path)
    scores = dict(re.findall(r"^(CALM features|raw pixels):\s+([\d.]+)$", out, re.M))
    assert set(scores) == {"CALM features", "raw pixels"}, out
    # What the example shows: the features beat the pixels under the same probe.
    assert float(scores["CALM features"]) > float(scores["raw pixels"]), out


def test_torch_example(tmp_path):
    out = run([str(EXAMPLES / "torch_module.py")], tmp_path)
    diff = float(re.search(r"max \|torch - transform\| = (\S+)", out).group(1))
    assert diff < 1e-4, out


def test_readme_python_block(tmp_path):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) == 1
    script = tmp_path / "readme.py"
    script.write_text(blocks[0])
    out = run([str(script)], tmp_path)
    assert float(out.strip().splitlines()[-1]) > 0.9, out
    assert pathlib.Path(tmp_path / "digits.safetensors").exists()

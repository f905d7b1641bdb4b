"""The lowest transformers / tokenizers that pyproject.toml admits load the model and tokenizer and generate.

The test installs those versions (pip --target, once, into .ci/lowest-<versions>) and runs a child Python with them
ahead of the venv's: the bundled demo model through the loader (its tokenizer, chat template, one generation) and a
tiny model in the Hub layout through AutoModel/AutoTokenizer.
"""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, tempfile
from pathlib import Path
import transformers, tokenizers
from packaging.version import Version
got = (Version(transformers.__version__), Version(tokenizers.__version__))
assert got == (Version(sys.argv[1]), Version(sys.argv[2])), got
from transformers import AutoModel, AutoTokenizer
from llada_xp.config import ModelConfig, SamplerConfig
from llada_xp.loading import load_model
from llada_xp.sampler import Request, Sampler
from tests import tiny

loaded = load_model(ModelConfig())
tok = loaded.tokenizer
ids = tok.apply_chat_template([{"role": "user", "content": "Add: 42 + 7"}], add_generation_prompt=True)
ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
res = Sampler(loaded.model, loaded.info.ids, decode=tok.decode).generate([Request(ids, SamplerConfig())])[0]
assert res.text == "42 + 7 = 49", res.text
with tempfile.TemporaryDirectory() as d:
    tiny.write_hub_folder(Path(d), tiny.model())
    m, t = AutoModel.from_pretrained(d), AutoTokenizer.from_pretrained(d)
    assert type(m).__name__ == "LLaDAModelLM" and t.decode(t("hello world")["input_ids"]) == "hello world"
print("ok")
"""


def lowest(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(rf"{name}\b", d))
    return re.search(r">=\s*([\w.]+)", spec).group(1)


def test_lowest_declared_transformers_and_tokenizers_work(tmp_path):
    versions = {"transformers": lowest("transformers"), "tokenizers": lowest("tokenizers")}
    target = ROOT / ".ci" / f"lowest-transformers{versions['transformers']}-tokenizers{versions['tokenizers']}"
    if not (target / "transformers").is_dir():
        # --no-deps: the venv has the rest; huggingface-hub < 1.0 is what transformers 4.x requires
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        f"transformers=={versions['transformers']}", f"tokenizers=={versions['tokenizers']}",
                        "huggingface-hub<1.0"], check=True, timeout=600)
    out = subprocess.run([sys.executable, "-c", CHILD, versions["transformers"], versions["tokenizers"]], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": f"{target}:{ROOT}", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                              "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")

"""The demo's seed 0 gated under the default policy, as the demo gates it, without the rest of
the demo (docs/gate.md).

python benchmarks/gate_demo_seed.py    # about 6 min on 2 cores; writes /tmp/demo_gate
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ecgx.demo import DEMO_BEATS, DEMO_DATA_SEED, DEMO_VALIDATION_BEATS, VALIDATION_SEED
from ecgx.training.config import TrainConfig
from ecgx.training.data.synth import synthesize_dataset
from ecgx.training.export import export_checkpoint
from ecgx.training.models import ModelConfig
from ecgx.training.train import CHECKPOINT_FILE, seed_dir, train_run
from ecgx.validation.gate import run_gate, summary_lines

out = Path("/tmp/demo_gate")
out.mkdir(exist_ok=True)
t = time.time()
if not (out / "data" / "signals.npy").exists():
    synthesize_dataset(out / "data", DEMO_BEATS, DEMO_DATA_SEED, overwrite=True, show_progress=False)
    n_validation = DEMO_VALIDATION_BEATS
    synthesize_dataset(out / "validation", n_validation, VALIDATION_SEED, overwrite=True, show_progress=False)
if not (seed_dir(out / "runs", 0) / CHECKPOINT_FILE).exists():
    train_run(out / "data", [0], out / "runs", ModelConfig(), TrainConfig(), show_progress=False)
pkg = out / "packages" / "seed-0"
if not (pkg / "manifest.json").exists():
    export_checkpoint(seed_dir(out / "runs", 0) / CHECKPOINT_FILE, pkg)
print("prepared", time.time() - t, flush=True)
run = run_gate(pkg, out / "validation", show_progress=False)  # the default policy
(out / "gate.json").write_text(json.dumps(run.report, indent=1))
print("\n".join(summary_lines(run.report)))
print("total", time.time() - t)

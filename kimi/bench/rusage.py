"""Run a module as __main__ and report its exact peak memory: `python -m kimi.bench.rusage MODULE ARGS...`
prints, as its last stderr line, `RUSAGE {"self_mb": ...}`: VmHWM, the peak RSS of this process's own
memory. (getrusage's ru_maxrss is no use here: Linux carries the parent's high-water mark over fork+exec.)"""

import json
import runpy
import sys

from kimi.bench.tables import vm_hwm

if __name__ == "__main__":
    module, sys.argv = sys.argv[1], sys.argv[1:]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    print("RUSAGE " + json.dumps({"self_mb": (vm_hwm() or 0) / 2**20}), file=sys.stderr)
    sys.exit(code)

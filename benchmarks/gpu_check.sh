#!/usr/bin/env bash
# On a machine with a CUDA device (its own python3 with a CUDA torch): the CUDA tests, the
# benchmark on the device and on its CPU, and the whole suite on that torch (SUITE=0 skips it).
# Everything goes to $OUT (default /tmp/gpu-check), one file per part; each part runs under its
# own timeout.
set -u
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONPATH=.
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
    > "$out/torch.txt" 2>&1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$out/test_cuda.txt" 2>&1
echo "exit $?" >> "$out/test_cuda.txt"
timeout 150 python3 benchmarks/run.py --device cuda --repeats 15 --json "$out/bench_cuda.json" > "$out/bench_cuda.txt" 2>&1
echo "exit $?" >> "$out/bench_cuda.txt"
# the same benchmark on this machine's CPU, two threads (real-model rows use one): a quieter
# host than a shared one gives steadier CPU ratios
timeout 150 python3 benchmarks/run.py --repeats 15 --threads 2 --json "$out/bench_cpu.json" > "$out/bench_cpu.txt" 2>&1
echo "exit $?" >> "$out/bench_cpu.txt"
if [ "${SUITE:-1}" != 0 ]; then
    workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12" || echo "")
    timeout 170 python3 -m pytest -q -p no:cacheprovider $workers --deselect tests/test_cuda.py \
        > "$out/suite.txt" 2>&1
    echo "exit $?" >> "$out/suite.txt"
fi
tail -3 "$out"/*.txt

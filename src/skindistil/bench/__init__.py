"""Benchmarks, one job per module, all timed by the one timer and memory meter of `skindistil.measure`.

- specs.py: models named on the command line (artifact directories, timm specs ARCH[@DEPTH][:K=V,...])
- summary.py: parameters, weight bytes, FLOPs, ViT shape, BMA from metrics.json; machine info
- models.py: the model/backend benchmark runner (`skindistil benchmark`)
- report.py: the paper's teacher/student ratios, bench.md, bench.png, bench.json
- data.py: the prepare and training-loader benchmark (`skindistil bench-data`)
- training.py: training throughput against the raw train step (benchmarks/train_throughput.py)

The early-exit timing (`evaluation.early_exit.measure_throughput`) stays in evaluation/: the
`evaluate --early-exit` report is built there and evaluation must not import this layer.
"""

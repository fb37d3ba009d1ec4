"""`ptft bench`: benchmark.py (step time, throughput, MFU, compile and memory for the cases),
report.py (the machine, the table and chart),
workloads.py (what each case trains), finetune.py and pipeline.py (finetuning strategies,
the input pipeline), profiling.py (where a step's time goes)."""

"""The reproduction harness behind `reproduce.py`: everything a paper cell needs besides the method itself.

    runtime.py          settings, device, atomic files, resumable state, the one training step
    config.py           the task registry; paper_hparams.yaml -> a typed run config -> a model
    inputs.py           find or fetch a run's checkpoint, dataset and class names (rank 0 first)
    results.py          result files and their one writer, cell claims, tables beside the paper
    runs.py             what a command runs: one run, sweeps, seeds, tables, the worker queue
    classification.py   FGVC / VTAB-1k runs
    segmentation.py     ADE20K with SETR-PUP
    serving.py          prompt packs -> top-5 predictions (`reproduce.py predict`)
    downloads.py        verified downloads and backbone checkpoints
    data/               readers and decode cache (datasets.py), batches, dataset release files
    figures/            the paper's figures and analysis tables
"""

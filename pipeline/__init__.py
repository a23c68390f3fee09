"""calm-stream's I/O around the model: settings.py (every setting), demo.py (`calm-stream demo`),
and one room per thing a reader looks for: cli/ (the command line), kafka/ (clients, checks,
positions), stream/ (the streaming job on Ray), sinks/ (Parquet output, metrics, reports),
sim/ (simulated input), bench/ (the benchmarks), training/ (the Ray Train job)."""

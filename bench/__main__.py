from bench.bench import cli

cli()

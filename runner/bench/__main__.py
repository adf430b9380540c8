from runner.interrupts import run_command

# main() keeps what was measured on Ctrl-C; before it runs (imports, flags) nothing was.
run_command("runner.bench.run", "nothing was measured (not logged to MLflow)")

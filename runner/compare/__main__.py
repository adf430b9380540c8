from runner.interrupts import run_command

run_command("runner.compare.cli")

from runner.interrupts import run_command

# Imported inside run_command's catch: Ctrl-C while Hydra imports (~1 s) is one line too.
run_command("runner.cli")

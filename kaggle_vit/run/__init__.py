"""A cv run: its settings resolved (`settings`), its folder (`rundir`), one fold trained (`fold`),
folds in a process pool (`jobs`), and the run as a whole (`cv`), with pseudo-labels (`pseudo`)."""

"""The lab: every claim about normalisation as an experiment that trains or probes real models.

Nothing in the layer library (``normlab`` itself) imports this package; it needs
the ``lab`` extra (``pip install 'normlab[lab]'``). Modules:

* :mod:`~normlab.lab.config` typed configs and the ``--set key=value`` parser;
* :mod:`~normlab.lab.train` the one training loop, :mod:`~normlab.lab.launch` torch.distributed set-up;
* :mod:`~normlab.lab.store` the run store, :mod:`~normlab.lab.executors` where the runs of a sweep run;
* :mod:`~normlab.lab.data`, :mod:`~normlab.lab.models`, :mod:`~normlab.lab.probes`;
* :mod:`~normlab.lab.experiments` the framework, the verdict engine and one module per claim;
* :mod:`~normlab.lab.report` the HTML/Markdown report; :mod:`~normlab.lab.cli` the ``normlab`` command.
"""

"""The benchmark engine of rlkernels: ``rlkernels-bench`` / ``python -m rlkernels.bench`` (see __main__).

Layers, each importing only those above it: trainers.py (the trainers' own estimators and losses, transcribed;
the tests use them too), common.py (the timer, the cold-data method, the byte model, what machine this is),
baselines.py (each trainer's code adapted to one benchmark input), cases.py (shapes, inputs and providers of
every op family), engine.py (times and checks the providers of a case, makes the rows), __main__.py (the
command: table, CSV, markdown, plot), plot.py (draws a results CSV). Needs the ``bench`` extra (rich,
matplotlib; scipy and torchrl add baselines): ``pip install 'rlkernels[bench]'``.
"""

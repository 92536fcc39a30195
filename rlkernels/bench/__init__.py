"""The benchmark command of rlkernels: ``rlkernels-bench`` / ``python -m rlkernels.bench`` (see __main__).

common.py holds the inputs, the cold-cache timer and the byte model; baselines.py the code trainers run
today (SB3, CleanRL, verl, scipy, TorchRL); plot.py draws a results CSV. Needs the ``bench`` extra
(rich, matplotlib; scipy and torchrl add baselines): ``pip install 'rlkernels[bench]'``.
"""

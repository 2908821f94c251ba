"""Data preparation: from a source to the tokens every model trains on.

Entry points: ``prepared.prepare`` (the one cached tokenisation pass of a job: every model's tokens of every
row, read by index with ``prepared.open_data``), ``tasks.load_rows`` (a source's rows under template field
names), ``encoding.encode_example`` / ``encoding.collate`` (one row in one model's tokens; a batch),
``answer_cut.encode_for_all`` (an answer cut once where every tokenizer fits), ``known_truth`` (a task with a
known answer distribution and its metrics), ``metrics`` (exact match, F1, ROUGE-Lsum).
"""

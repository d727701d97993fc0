"""``codec batch``: whole datasets coded on a Ray cluster (a local Ray instance by default).

* :mod:`.command`: the click group (import-light: no Ray, no torch until a command runs);
* :mod:`.inputs`: SRC (folder, glob or manifest, local or any fsspec URL) -> (input, output)
  pairs mirroring the input tree under DST; reading and atomic writing on either kind of path;
* :mod:`.worker`: the actor that loads the model once and codes batches of inputs into result rows;
* :mod:`.job`: the driver: Ray start or join, the dataset and actor pool, retries, the result
  manifest (JSON Lines) and the summary line.
"""

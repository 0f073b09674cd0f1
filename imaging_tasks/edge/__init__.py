"""The DICOM receiver (``imaging-tasks receive``): modalities and PACS push studies by C-STORE, the receiver puts
them in the landing bucket where the specialty DAGs pick them up.

Why it is built the way it is:

* **An acknowledgement is a promise.**  A C-STORE is answered 0x0000 only once the instance is on local disk
  (fsync'd, :mod:`~imaging_tasks.edge.spool`); the sender may then delete it.  The landing bucket can be down for
  hours: the spool holds everything and :mod:`~imaging_tasks.edge.uploader` drains it when the bucket is back.
* **Exactly once by key.**  An instance always goes to the same object key (hashes of its UIDs, or its
  pseudonymous UIDs in edge mode), so a resend, a restart or a crash between upload and clean-up rewrites the
  same object instead of adding one.
* **No PHI in names or logs.**  Object names, spool names, log lines, manifests and asset events carry hashes,
  pseudonyms, counts, AE titles and specialty names only.
* **Edge mode** (``--deidentify``) de-identifies on receipt: raw bytes never leave the site; refused instances are
  held in a local quarantine.
* **Study completion** (:mod:`~imaging_tasks.edge.completion`) tells Airflow a study is whole, so its DAG runs
  at once instead of at the next poll.

Modules: :mod:`~imaging_tasks.edge.routing` (which specialty), :mod:`~imaging_tasks.edge.spool`,
:mod:`~imaging_tasks.edge.uploader`, :mod:`~imaging_tasks.edge.completion`, :mod:`~imaging_tasks.edge.scp`
(the network side and the wiring).  Nothing here imports Airflow: Airflow is reached over its REST API.
"""

"""Questions with gold answers and provenance, read from every format ragline knows, for evaluation and training
alike: task files in the RAG paper's public formats (:mod:`.formats`) and the bundled FanOutQA dev split
(:mod:`.fanoutqa`). One bad-record policy: a malformed record is an error naming its file and line, or with
``skip_bad`` (``--skip-bad``) is skipped and listed in :attr:`Task.skipped`; it is never scored or trained on.
"""

from ragline.questions.fanoutqa import answerable, dev_questions, load_fanoutqa
from ragline.questions.formats import FORMATS, detect_format, load_task
from ragline.questions.records import BadRecord, Page, Question, Task, answer_strings, titled

__all__ = ["FORMATS", "BadRecord", "Page", "Question", "Task", "answer_strings", "answerable", "detect_format",
           "dev_questions", "load_fanoutqa", "load_task", "titled"]

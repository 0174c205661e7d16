"""The Gradio widget of the BrierLM metric's Hub Space (`sdk: gradio`, `app_file: app.py` in README.md).

As `evaluate`'s metric template, it loads the metric and hands it to `evaluate.utils.launch_gradio_widget`. It loads
`brierlm.py` next to this file rather than `"<namespace>/brierlm"` from the Hub, so it needs no namespace and runs the
same from the Space, from a copy of the folder, or from the installed package (`python app.py`).
"""

import os

import evaluate
from evaluate.utils import launch_gradio_widget

module = evaluate.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "brierlm.py"))
launch_gradio_widget(module)

"""Shared set-up for the Grow page tests (threads in test_ui_grow, a Dask worker in test_ui_dask)."""
import threading


def small(page, steps=6):
    """A small digits model that trains in seconds."""
    page.dataset.value = "digits"
    page.model_widgets["d_model"].value = 16
    page.model_widgets["d_hidden"].value = 16
    page.train_widgets["eval_every"].value = 3
    page.train_widgets["eval_max"].value = 200
    page.stage_steps.value = steps


def grow_pressing_add_now(page, steps: int) -> threading.Event:
    """Train one block from scratch for ``steps`` and press "add a block now" at the first progress
    update, as a user would; returns the event that says the button was pressed (and was enabled)."""
    small(page, steps=steps)
    page.preset.value = "Scratch"
    page.final_layers.value = 1
    page.fill_preset()
    pressed = threading.Event()
    original = page.on_update

    def press_once(payload):
        original(payload)
        if not pressed.is_set() and not page.add_now.disabled:
            pressed.set()
            page.add_now.clicks += 1

    page.task.on_update = press_once
    page.start()
    page.task.join(timeout=300)
    return pressed

"""Served by `panel serve apps/`: one App (and run store view) per browser session.

A student over their bound of open sessions (``WORKBENCH_SESSIONS_PER_USER``) gets a page saying why
instead. With sign-in, the header has a link to sign out.
"""
import html

import panel as pn

from workbench.ui import App
from workbench.ui.frontend import EXTENSIONS
from workbench.ui.serving import claim_session_slot
from workbench.ui.teacher import current_user

pn.extension(*EXTENSIONS, notifications=True)   # the notebook explorers load the same list (wb.ui.extension)
refusal = claim_session_slot()
if refusal is not None:
    pn.template.BootstrapTemplate(title="Depth Workbench", header_background="#2f3e4e", busy_indicator=None, main=[
        pn.pane.Alert(refusal, alert_type="warning", name="session-limit")]).servable()
else:
    template = App().template()
    user = current_user()
    if user is not None and pn.state.cookies.get("workbench_session"):   # signed in with our sign-in
        template.header.append(pn.pane.HTML(
            f'<a href="/logout" style="color:#fff">Sign out ({html.escape(user)})</a>', name="sign-out"))
    template.servable()

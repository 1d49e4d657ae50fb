"""Model and dataset card templates (Jinja `{{ field }}` markdown, filled by `ambiseg_diffusers.hub_utils`).

They live at the top of the repository, where the layout puts them, and ship inside the installed package as
`ambiseg_diffusers.model_cards` (pyproject.toml maps this folder there), so training runs installed from a wheel write
their cards too.
"""

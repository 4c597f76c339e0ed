# %% [markdown]
# # Chapter title (one idea per chapter)
#
# Narrative first: what the reader will learn, with citations such as {cite}`kratsios2025momlp`.
#
# :::{admonition} Our design choice
# :class: note
# Where a paper's text is unavailable and the book decides a detail itself, say so in a box like this.
# :::

# %%
import momlp_lite as ml

chapter = ml.start_chapter(seed=0)  # reads MOMLP_PROFILE once, seeds, picks the device, prints what ran
sizes = ml.choose(
    smoke=dict(points=1_000),      # CI/nbval: seconds for the whole chapter
    default=dict(points=20_000),   # the rendered book: minutes on a CPU
    paper=dict(points=1_000_000),  # the papers' settings: meant for a GPU
)

# %% [markdown]
# Short code cells calling momlp_lite; every figure is plotly (fig.show()); every claim asserted:

# %%
assert sizes["points"] > 0

# %% [markdown]
# ## Exercises
#
# :::{exercise}
# :label: ex-template-concept
# A conceptual question.
# :::
#
# :::{solution} ex-template-concept
# :class: dropdown
# Its answer.
# :::
#
# :::{exercise}
# :label: ex-template-code
# A coding question.
# :::
#
# ````{solution-start} ex-template-code
# :class: dropdown
# ````

# %%
# the coding solution runs (nbval and the book build execute it)
print("solution")

# %% [markdown]
# ````{solution-end}
# ````

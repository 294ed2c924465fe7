"""One run of a cell: its state model (:mod:`.cell_state`), its folder (:mod:`.folder`), the checks
before it starts (:mod:`.checks`), and the runner that pretrains then evaluates (:mod:`.runner`,
:mod:`.evaluation`). Import the modules directly: this imports nothing."""

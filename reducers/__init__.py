"""Token-reduction operators and the one module that patches timm.

    model = reducers.apply_schedule(model, schedule)   # patch in place, returns the model
    reducers.remove_schedule(model)                    # timm's own model again
"""

from reducers.patch import ForwardState, apply_schedule, current_schedule, last_forward_state, remove_schedule

__all__ = ["ForwardState", "apply_schedule", "current_schedule", "last_forward_state", "remove_schedule"]

-- The W3C traceparent of the evaluation that logged a change (NULL when nothing was being
-- traced), so that delivering the change to a subscriber joins the trace of the event
-- that caused it, whichever replica delivers it.
ALTER TABLE changes ADD COLUMN trace_parent text;

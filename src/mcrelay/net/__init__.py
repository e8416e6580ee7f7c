"""Socket primitives shared by the supervisor's membership and the relay engine."""

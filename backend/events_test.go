package backend

import (
	"fmt"
	"testing"
	"time"
)

// A subscriber that falls far behind still gets every event, in order,
// and the Manager never waits for it.
func TestSlowSubscriberMissesNothing(t *testing.T) {
	m, err := NewManager(&Config{}, ManagerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	events, cancel := m.Subscribe()
	defer cancel()
	const n = 10 * subscriberBuffer
	done := make(chan struct{})
	go func() {
		for i := 0; i < n; i++ {
			m.emit(Event{Kind: EventVolumeRemoved, VolumeID: fmt.Sprint(i)})
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("emit blocked on a subscriber that does not read")
	}
	for i := 0; i < n; i++ {
		select {
		case e := <-events:
			if e.VolumeID != fmt.Sprint(i) {
				t.Fatalf("event %d: got volume %q, want %d (lost or reordered)", i, e.VolumeID, i)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("event %d of %d never came", i, n)
		}
	}
	cancel()
	for range events { // closed after cancel
	}
}

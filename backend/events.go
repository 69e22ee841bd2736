package backend

import "sync"

// subscriberBuffer is how many events a subscriber may fall behind before
// it loses events.
const subscriberBuffer = 256

// subscribers fans events out. Sends never block: a subscriber whose
// buffer is full loses the event, so a slow
// D-Bus client cannot stall the Manager.
type subscribers struct {
	mu     sync.Mutex
	next   int
	chans  map[int]chan Event
	closed bool
}

// Subscribe returns a channel of events and a function that ends the
// subscription and closes the channel. The channel is buffered
// (subscriberBuffer events); when it is full, new events are dropped for
// this subscriber rather than blocking the Manager — a subscriber that
// must not miss anything re-reads Volumes/Jobs after catching up. Close
// closes every subscription's channel. cancel is idempotent.
func (m *Manager) Subscribe() (events <-chan Event, cancel func()) {
	s := &m.subs
	s.mu.Lock()
	defer s.mu.Unlock()
	ch := make(chan Event, subscriberBuffer)
	if s.closed {
		close(ch)
		return ch, func() {}
	}
	if s.chans == nil {
		s.chans = map[int]chan Event{}
	}
	id := s.next
	s.next++
	s.chans[id] = ch
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			if c, ok := s.chans[id]; ok {
				delete(s.chans, id)
				close(c)
			}
		})
	}
}

// emit sends e to every subscriber without blocking.
func (m *Manager) emit(e Event) {
	s := &m.subs
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, ch := range s.chans {
		select {
		case ch <- e:
		default: // the subscriber is behind; it loses this event
		}
	}
}

func (s *subscribers) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for id, ch := range s.chans {
		close(ch)
		delete(s.chans, id)
	}
}

module github.com/volagent/volagent

go 1.26
